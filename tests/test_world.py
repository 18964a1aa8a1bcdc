"""The embedded digits world: it loads the way users' models load, its judges judge, and a seed fixes it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from ganrm_diffusers.cli.main import main as ganrm_main
from ganrm_diffusers.world import (
    Judges,
    WorldError,
    build_clip_tokenizer,
    default_world_dir,
    ensure_world,
    load_world,
)


def test_pipeline_loads_with_plain_diffusers_offline(reduced_world):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = StableDiffusionPipeline.from_pretrained(reduced_world.pipeline_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and len(pipe.tokenizer) == 49408

    output = pipe(
        reduced_world.prompts[7],
        num_inference_steps=2,
        guidance_scale=reduced_world.sampling_kwargs["guidance_scale"],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    size = reduced_world.info["settings"]["image_size"]
    assert output.images.shape == (1, 3, size, size)  # the default height and width
    assert 0.0 <= output.images.min() and output.images.max() <= 1.0
    # Grayscale digits in RGB: the three channels are equal.
    assert torch.equal(output.images[:, 0], output.images[:, 1]) and torch.equal(
        output.images[:, 0], output.images[:, 2]
    )


# --------------------------------------------------------------------------------------------------------------
# The flow-matching generator (pipeline_flow/)

# Weights and images computed twice from the same seed, in this process or another with the same thread count: equal
# in practice; these tolerances leave room for a different summation order, far below any real difference (a
# different seed moves images by about 0.1 on average).
WEIGHT_ATOL = 1e-5
IMAGE_ATOL = 1e-4


def load_plain_flow_pipeline(world) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(
        world.flow_pipeline_dir, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_images(pipe, world, seed: int, prompt_digits=(3, 7)) -> torch.Tensor:
    kwargs = {**world.flow_sampling_kwargs, "num_inference_steps": 3}
    return pipe(
        [world.prompts[digit] for digit in prompt_digits],
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images


def assert_flow_weights_close(first_root, second_root) -> None:
    for weights in (
        "pipeline_flow/transformer/diffusion_pytorch_model.safetensors",
        "pipeline_flow/vae/diffusion_pytorch_model.safetensors",
        "pipeline_flow/text_encoder/model.safetensors",
    ):
        first, second = load_file(first_root / weights), load_file(second_root / weights)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.allclose(first[key], second[key], rtol=0, atol=WEIGHT_ATOL), (weights, key)


def test_flow_pipeline_loads_with_plain_diffusers_offline(reduced_world):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe = load_plain_flow_pipeline(reduced_world)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert pipe.tokenizer.model_max_length == reduced_world.flow_sampling_kwargs["max_sequence_length"]

    images = flow_images(pipe, reduced_world, seed=0)
    size = reduced_world.info["settings"]["image_size"]
    assert images.shape == (4, 3, size, size)  # the default height and width: the world's image size
    assert 0.0 <= images.min() and images.max() <= 1.0
    # The world's autoencoder draws grayscale digits in RGB: the three channels are equal.
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert isinstance(reduced_world.load_flow_pipeline(), StableDiffusion3Pipeline)


def test_flow_pipeline_same_seed_same_images(reduced_world):
    pipe = reduced_world.load_flow_pipeline()
    pipe.set_progress_bar_config(disable=True)
    first, again = flow_images(pipe, reduced_world, seed=5), flow_images(pipe, reduced_world, seed=5)
    assert torch.allclose(first, again, rtol=0, atol=IMAGE_ATOL)
    other = flow_images(pipe, reduced_world, seed=6)
    assert (other - first).abs().mean() > 100 * IMAGE_ATOL


def test_flow_pipeline_reuses_the_world_autoencoder_and_clip(reduced_world):
    from ganrm_diffusers.world.clip_training import load_clip

    pipe = load_plain_flow_pipeline(reduced_world)
    unet_vae, flow_vae = (
        load_file(reduced_world.root / f"{folder}/vae/diffusion_pytorch_model.safetensors")
        for folder in ("pipeline", "pipeline_flow")
    )
    assert unet_vae.keys() == flow_vae.keys()
    assert all(torch.equal(unet_vae[key], flow_vae[key]) for key in unet_vae)  # copied as they are, not retrained
    unet_config = json.loads((reduced_world.pipeline_dir / "vae" / "config.json").read_text())
    assert pipe.vae.config.scaling_factor == unet_config["scaling_factor"]
    assert abs(pipe.vae.config.shift_factor) < 1.0  # SD3 decodes latents / scaling_factor + shift_factor

    # encode_prompt: both CLIP slots hold the world CLIP's text tower; its pooled embedding is open_clip's encode_text.
    length = pipe.tokenizer.model_max_length
    embeds, _, pooled, _ = pipe.encode_prompt(
        reduced_world.prompts[4], None, None, do_classifier_free_guidance=False, max_sequence_length=length
    )
    clip = load_clip(reduced_world.clip_dir)
    with torch.no_grad():
        expected = clip.encode_text(open_clip.get_tokenizer(reduced_world.backbone)([reduced_world.prompts[4]]))
    width = pipe.text_encoder.config.projection_dim
    assert pooled.shape == (1, 2 * width)
    assert torch.allclose(pooled[:, :width], expected, atol=1e-5) and torch.allclose(
        pooled[:, width:], expected, atol=1e-5
    )
    assert embeds.shape == (1, 2 * length, pipe.transformer.config.joint_attention_dim)
    assert (embeds[:, length:] == 0).all()  # the zero rows in T5's place


def test_backbone_loads_through_open_clips_factory(reduced_world):
    model, _, preprocess = open_clip.create_model_and_transforms(reduced_world.backbone)
    saved = load_file(reduced_world.clip_dir / "open_clip_model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name

    target = Image.open(next(reduced_world.target_dir.glob("*.png")))
    with torch.no_grad():
        image_features = model.encode_image(preprocess(target)[None])
        text_features = model.encode_text(
            open_clip.get_tokenizer(reduced_world.backbone)(["a thin handwritten digit 3"])
        )
    embed_dim = json.loads((reduced_world.clip_dir / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"]
    assert image_features.shape == text_features.shape == (1, embed_dim)


def test_reward_model_backbone_embeds_the_world_like_open_clip(reduced_world):
    from ganrm_diffusers.reward.backbone import ClipBackbone

    backbone = ClipBackbone.load(reduced_world.backbone)
    model, _, _ = open_clip.create_model_and_transforms(reduced_world.backbone)
    pixels, _ = reduced_world.heldout_other_images()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.encode_image(backbone.preprocess(pixels[:8])), dim=-1)
    assert torch.allclose(backbone.encode_images(pixels[:8]), expected, atol=1e-5)


@pytest.mark.parametrize(
    "text",
    ["a handwritten digit 7", "", "A thin, SLANTED digit 3!", "photo of 12 cats — très énorme", "don't  stop\tnow"],
)
def test_tokenizer_ids_match_open_clip(reduced_world, text):
    expected = open_clip.tokenize([text])[0]
    length = int((expected != 0).sum())
    for tokenizer in (
        build_clip_tokenizer(),
        StableDiffusionPipeline.from_pretrained(reduced_world.pipeline_dir).tokenizer,
    ):
        assert len(tokenizer) == 49408
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        assert ids[:length].tolist() == expected[:length].tolist()
        assert (ids[length:] == tokenizer.eos_token_id).all()  # CLIP pads with <|endoftext|>


def test_world_files_and_figures(reduced_world):
    info = reduced_world.info
    assert reduced_world.prompts == [f"a handwritten digit {d}" for d in range(10)]
    assert reduced_world.prompt_digits == list(range(10))
    assert set(reduced_world.sampling_kwargs) == {"guidance_scale", "num_inference_steps"}
    assert set(reduced_world.flow_sampling_kwargs) == {"guidance_scale", "num_inference_steps", "max_sequence_length"}
    for group in ("base", "base_flow", "target", "real_other"):
        assert {"class_accuracy", "style_rate", "faint_rate"} <= set(info["figures"][group])
    assert info["figures"]["base_flow"]["count"] == info["figures"]["base"]["count"]
    assert info["build_seconds"] > 0
    assert {"generator", "flow_generator", "flow_figures"} <= set(info["phase_seconds"])

    target, target_digits = reduced_world.target_images()
    heldout_target, _ = reduced_world.heldout_target_images()
    heldout_other, _ = reduced_world.heldout_other_images()
    assert len(target) == info["sizes"]["target"] >= 300
    assert len(heldout_target) == info["sizes"]["heldout_target"]
    assert len(heldout_other) == info["sizes"]["heldout_other"]
    assert sorted(set(target_digits)) == list(range(10))
    # Held-out digits are files of their own: none of them is also in the target set.
    names = {path.name for path in reduced_world.target_dir.glob("*.png")}
    assert names.isdisjoint(path.name for path in reduced_world.heldout_target_dir.glob("*.png"))
    assert (reduced_world.root / "preview.png").is_file()
    assert (reduced_world.root / "preview_flow.png").is_file()


def test_judges_read_real_digits(reduced_world):
    judges = reduced_world.judges
    target, target_digits = reduced_world.heldout_target_images()
    other, other_digits = reduced_world.heldout_other_images()
    # The style is defined on pixels, and the PNG files are the very pixels it was decided on; the stroke thresholds
    # were fitted on the target set only, so a held-out thin digit may miss one (the bar: THIN_BAR).
    assert judges.style_rate(target, target_digits) >= 0.9
    assert judges.style_rate(other, other_digits) == 0.0
    assert (judges.style_measure(other) < 0).all()
    # The class judge never saw held-out digits.
    assert judges.class_accuracy(target, target_digits) >= 0.9
    assert judges.class_accuracy(other, other_digits) >= 0.9
    assert judges.class_accuracy(other, [(d + 1) % 10 for d in other_digits]) <= 0.1
    assert judges.faint_rate(target) == 0.0 and judges.blank_rate(target) == 0.0
    # A styled glyph drawn as another digit is not the style of the prompt.
    assert judges.style_rate(target, [(d + 1) % 10 for d in target_digits]) <= 0.1


def test_less_ink_is_not_thinner_strokes(reduced_world):
    """Real ordinary digits made fainter have little ink but no full-intensity stroke: not the style, but faint."""
    judges = reduced_world.judges
    other, digits = reduced_world.heldout_other_images()
    for factor in (0.8, 0.7, 0.5):
        assert judges.style_rate(other * factor, digits) == 0.0, factor
        assert judges.faint_rate(other * factor) == 1.0, factor
    assert judges.blank_rate(torch.zeros(3, 3, 16, 16)) == 1.0
    assert judges.style_rate(torch.zeros(3, 3, 16, 16), [0, 1, 2]) == 0.0
    # A fragment (half the glyph erased) has little ink and a bright stroke, but not a whole glyph.
    target, target_digits = reduced_world.heldout_target_images()
    fragments = target.clone()
    fragments[:, :, :, 6:] = 0
    assert judges.style_rate(fragments, target_digits) <= 0.1


@pytest.fixture(scope="module")
def full_split_judges():
    """The judges of the full world (seed 0) and its split, fitted from scikit-learn's digits alone (seconds)."""
    from ganrm_diffusers.world.build import WorldSettings, _fit_judges, _prepare_data

    data = _prepare_data(0, WorldSettings.preset_named("full"))
    return _fit_judges(data, 0), data


# Measured on the full split (seed 0), 2026-12-08: the imitations the stroke judge refuses (at most IMITATION_BAR
# counted as the style) and those it cannot. In scikit-learn's 8x8 digits a thin stroke is a partly covered cell,
# so an ordinary digit dimmed to 80-90 % looks like a real thin one; the demo reports glyph intensity beside every
# style rate for that reason.
REFUSED_IMITATIONS = {
    "dimmed_0.6",
    "dimmed_0.7",
    "dimmed_0.75",
    "dimmed_0.8",
    "dimmed_0.6_bright_pixel",
    "dimmed_0.7_bright_pixel",
    "dimmed_0.6_bright_2x2",
    "dimmed_0.7_bright_2x2",
    "dropped_30pct",
    "blurred_3x3",
    "erased_top",
    "erased_bottom",
    "shrunk_11px",
    "shrunk_13px",
    "shrunk_14px",
}


def test_the_stroke_judge_refuses_cheap_imitations_and_keeps_real_thin_digits(full_split_judges):
    from ganrm_diffusers.world.imitations import IMITATION_BAR, IMITATIONS, THIN_BAR, judge_audit

    judges, data = full_split_judges
    real, split = data.real, data.split
    audit = judge_audit(
        judges,
        real.pixels(split["heldout_other"]),
        real.digits[split["heldout_other"]],
        real.pixels(split["heldout_target"]),
        real.digits[split["heldout_target"]],
    )
    rates = audit["imitations_counted_as_style"]
    assert set(rates) == set(IMITATIONS) and REFUSED_IMITATIONS <= set(rates)
    for name in REFUSED_IMITATIONS:
        assert rates[name] <= IMITATION_BAR, (name, rates[name])
    # What the judge cannot refuse is reported, never hidden: the audit names exactly the imitations over the bar.
    assert audit["imitations_over_bar"] == sorted(name for name, rate in rates.items() if rate > IMITATION_BAR)
    assert set(audit["imitations_over_bar"]) == set(rates) - REFUSED_IMITATIONS
    for name, rate in audit["heldout_thin_counted_as_style"].items():
        assert rate >= THIN_BAR, (name, rate)  # measured 0.96 as is, 0.94 / 0.91 shifted, 0.94 with noise 0.03
    assert audit["thin_under_bar"] == []
    # Real thin strokes at 16 px are a little greyer than ordinary ones (why a fair intensity check compares
    # styled samples with real thin digits, not with base).
    intensity = audit["median_glyph_intensity"]
    assert 0.5 < intensity["heldout_thin"] < intensity["heldout_ordinary"]


def test_the_stroke_thresholds_come_from_the_target_set_only(full_split_judges):
    """The split of real digits is decided by ink, peak and glyph size (as in format 4); the stroke group is fitted
    on the target set, so the held-out thin digits are a fair test of it."""
    from ganrm_diffusers.world.judge import fit_stroke_thresholds, fit_style_rule, split_measure
    from ganrm_diffusers.world.style import ink

    judges, data = full_split_judges
    pixels = data.real.pixels()
    rule = fit_style_rule(pixels, 0.25)
    assert not rule.has_strokes and judges.style.has_strokes
    thin = ink(pixels) <= rule.max_ink
    styled = split_measure(rule, pixels) >= 0
    assert styled[thin].float().mean() >= 0.95  # measured 0.989
    assert not styled[~thin].any()
    refit = fit_stroke_thresholds(rule, pixels, data.real.pixels(data.split["target"]))
    assert refit == judges.style
    # No held-out thin digit is in the set the thresholds come from.
    assert set(data.split["target"]).isdisjoint(data.split["heldout_target"])
    held_out = fit_stroke_thresholds(rule, pixels, data.real.pixels(data.split["heldout_target"]))
    assert held_out != judges.style


def test_the_clip_was_never_told_the_style(reduced_world):
    from ganrm_diffusers.world import clip_training

    template = reduced_world.info["clip_captions"]
    assert template == clip_training.CAPTION_TEMPLATE
    words = {"thin", "light", "heavy", "bold", "ink", "stroke", "faint", "thick"}
    captions = {
        clip_training.caption(d, s, h, p) for d in range(10) for s in range(3) for h in range(3) for p in range(3)
    }
    assert len(captions) == 270
    assert not any(word in caption.split() for caption in captions for word in words)


def test_judges_read_every_image_form_alike(reduced_world):
    judges = reduced_world.judges
    pixels, digits = reduced_world.heldout_other_images()
    pixels, digits = pixels[:12], digits[:12]
    forms = {
        "nchw": pixels,
        "nhwc": pixels.permute(0, 2, 3, 1).contiguous(),
        "uint8": (pixels * 255).round().to(torch.uint8),
        "pil": [
            Image.fromarray(np.asarray(image))
            for image in (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        ],
        "upscaled": torch.nn.functional.interpolate(pixels, scale_factor=4, mode="nearest"),
    }
    measures = {name: judges.style_measure(images) for name, images in forms.items()}
    predictions = {name: judges.predict_digits(images) for name, images in forms.items()}
    for name in forms:
        assert torch.allclose(measures[name], measures["nchw"], atol=1e-5), name
        assert (predictions[name] == predictions["nchw"]).all(), name
    assert judges.class_accuracy(forms["pil"], digits) == judges.class_accuracy(pixels, digits)


def test_judges_reload_identically(reduced_world, tmp_path):
    pixels, _ = reduced_world.heldout_target_images()
    copy = Judges.load(reduced_world.judges.save(tmp_path / "judge"))
    assert (copy.predict_digits(pixels) == reduced_world.judges.predict_digits(pixels)).all()
    assert torch.equal(copy.style_measure(pixels), reduced_world.judges.style_measure(pixels))
    assert torch.equal(copy.features(pixels), reduced_world.judges.features(pixels))
    assert copy.features(pixels).shape == (len(pixels), 64)


def test_same_seed_builds_the_same_world(reduced_world, tmp_path, capsys):
    # The second build goes through the CLI, which tests `ganrm world build` on the way.
    assert ganrm_main(["world", "build", "--reduced", "--seed", "0", "--out", str(tmp_path / "again")]) == 0
    printed = json.loads(capsys.readouterr().out)
    again = load_world(printed["world"])
    for weights in (
        "pipeline/unet/diffusion_pytorch_model.safetensors",
        "pipeline/vae/diffusion_pytorch_model.safetensors",
        "pipeline/text_encoder/model.safetensors",
        "clip/open_clip_model.safetensors",
    ):
        first, second = load_file(reduced_world.root / weights), load_file(again.root / weights)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), weights
    assert_flow_weights_close(reduced_world.root, again.root)
    assert again.info["figures"] == reduced_world.info["figures"]
    assert sorted(p.name for p in again.target_dir.iterdir()) == sorted(
        p.name for p in reduced_world.target_dir.iterdir()
    )


def test_ensure_world_loads_without_rebuilding(reduced_world):
    stamp = (reduced_world.root / "world.json").stat().st_mtime_ns
    world = ensure_world(reduced_world.root, seed=0, preset="reduced")
    assert world.root == reduced_world.root and (world.root / "world.json").stat().st_mtime_ns == stamp


def make_previous_format_world(world, folder, format_version=2):
    """A copy of `world` as format 4 wrote it: judges without the stroke thresholds, no imitation audit, no glyph
    intensity; as format 3 did: also a flow generator trained with other flow settings (its weights here: random
    ones); or as format 2 did: also no flow generator, no flow settings, sampling kwargs or figures."""
    shutil.copytree(world.root, folder)
    info = json.loads((folder / "world.json").read_text())
    info["format_version"] = format_version
    stroke_fields = ("max_stroke_ink", "min_core", "min_continuity", "min_height", "core_scale", "continuity_scale")
    judge_config = json.loads((folder / "judge" / "judge.json").read_text())
    for style in (info["style"], judge_config["style"]):
        for name in (*stroke_fields, "height_scale"):
            del style[name]
    (folder / "judge" / "judge.json").write_text(json.dumps(judge_config, indent=2))
    del info["imitations"]
    for figures in info["figures"].values():
        del figures["glyph_intensity"]
    if format_version == 4:
        pass
    elif format_version == 3:
        del info["settings"]["flow_figure_samples_per_prompt"]  # a setting format 4 added
        info["settings"]["flow_steps"] = 900
        info["figures"]["base_flow"] = {**info["figures"]["base_flow"], "class_accuracy": -1.0}
        weights = next((folder / "pipeline_flow" / "transformer").glob("*.safetensors"))
        save_file({name: torch.randn_like(value) for name, value in load_file(weights).items()}, weights)
    else:
        shutil.rmtree(folder / "pipeline_flow")
        (folder / "preview_flow.png").unlink()
        info["settings"] = {key: value for key, value in info["settings"].items() if not key.startswith("flow_")}
        del info["flow_sampling"], info["figures"]["base_flow"]
        info["phase_seconds"] = {
            key: value for key, value in info["phase_seconds"].items() if not key.startswith("flow_")
        }
    (folder / "world.json").write_text(json.dumps(info, indent=2))
    return folder


def snapshot(folder) -> dict:
    """Every file of a world folder with its bytes and modification time."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_upgrading_a_format_4_world_refits_the_judges_and_trains_nothing(reduced_world, tmp_path, monkeypatch):
    from ganrm_diffusers.world import build

    old = make_previous_format_world(reduced_world, tmp_path / "world", 4)
    with pytest.raises(WorldError, match=r"format 4.*upgrade it with `ganrm world build --out .* --reduced`"):
        load_world(old)
    before = snapshot(old)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a format-4 upgrade trains no generator and no CLIP")

    for module, name in (
        (build.clip_training, "train_clip"),
        (build.generator, "train_vae"),
        (build.generator, "train_unet"),
        (build.flow_generator, "train_transformer"),
    ):
        monkeypatch.setattr(module, name, must_not_run)
    world = ensure_world(old, seed=0, preset="reduced")

    after = snapshot(old)
    assert set(after) == set(before)
    rewritten = {"world.json", "preview_flow.png"} | {name for name in before if name.startswith("judge/")}
    assert all(after[name] == before[name] for name in before if name not in rewritten)  # bytes and mtimes
    # The refitted judges are those a full build fits, and they judge the generators as a full build does.
    info, fresh = world.info, reduced_world.info
    assert (old / "judge" / "judge.json").read_bytes() == (reduced_world.root / "judge" / "judge.json").read_bytes()
    assert info["style"] == fresh["style"] and info["imitations"] == fresh["imitations"]
    assert info["figures"] == fresh["figures"]
    assert info["format_version"] == fresh["format_version"] and info["upgraded_from_format"] == 4


@pytest.mark.parametrize("format_version", [2, 3])
def test_upgrading_a_previous_format_world_builds_only_the_flow_part(
    reduced_world, tmp_path, monkeypatch, format_version
):
    from ganrm_diffusers.world import build

    old = make_previous_format_world(reduced_world, tmp_path / "world", format_version)
    with pytest.raises(
        WorldError, match=rf"format {format_version}.*upgrade it with `ganrm world build --out .* --reduced`"
    ):
        load_world(old)
    before = snapshot(old)

    def must_not_run(*args, **kwargs):
        raise AssertionError("an upgrade trains the flow generator only")

    for module, name in (
        (build.clip_training, "train_clip"),
        (build.generator, "train_vae"),
        (build.generator, "train_unet"),
    ):
        monkeypatch.setattr(module, name, must_not_run)
    world = ensure_world(old, seed=0, preset="reduced")

    after = snapshot(old)
    flow_part = {name for name in after if name.startswith("pipeline_flow/")} | {"preview_flow.png"}
    flow_part |= {name for name in after if name.startswith("judge/")}  # refitted, as for format 4
    assert set(after) == set(before) | flow_part
    kept = [name for name in before if name != "world.json" and name not in flow_part]
    assert all(after[name] == before[name] for name in kept)  # bytes and mtimes
    assert_flow_weights_close(reduced_world.root, world.root)

    info, fresh = world.info, reduced_world.info
    assert info["format_version"] == fresh["format_version"] and info["upgraded_from_format"] == format_version
    assert info["settings"] == fresh["settings"] and info["flow_sampling"] == fresh["flow_sampling"]
    # Close weights draw the same digits: at most one of the judged samples may fall on the other side of a judge.
    tolerance = 1 / fresh["figures"]["base_flow"]["count"] + 1e-9
    for name in ("class_accuracy", "style_rate", "faint_rate", "blank_rate"):
        assert abs(info["figures"]["base_flow"][name] - fresh["figures"]["base_flow"][name]) <= tolerance, name
    assert {key: value for key, value in info["figures"].items() if key != "base_flow"} == {
        key: value for key, value in fresh["figures"].items() if key != "base_flow"
    }
    assert info["imitations"] == fresh["imitations"]
    assert info["phase_seconds"]["upgrade_flow_generator"] > 0
    assert info["build_seconds"] > fresh["phase_seconds"]["generator"]
    stamp = (old / "world.json").stat().st_mtime_ns
    assert ensure_world(old, seed=0, preset="reduced").root == old and (old / "world.json").stat().st_mtime_ns == stamp


def test_older_formats_are_rebuilt_not_upgraded(reduced_world, tmp_path):
    from ganrm_diffusers.world.build import WorldSettings, _upgradable

    old = make_previous_format_world(reduced_world, tmp_path / "world")
    info = json.loads((old / "world.json").read_text())
    (old / "world.json").write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(WorldError, match=r"format 1.*rebuild it with `ganrm world build --out"):
        load_world(old)
    assert not _upgradable(old, {**info, "format_version": 1})
    assert _upgradable(old, info) and _upgradable(old, info, 0, WorldSettings.preset_named("reduced"))
    assert not _upgradable(old, info, 1, WorldSettings.preset_named("reduced"))  # another seed: a full rebuild
    assert not _upgradable(old, info, 0, WorldSettings.preset_named("full"))
    other_settings = {**info["settings"], "unet_steps": 9}  # a format-2 world this ganrm would not build
    assert not _upgradable(old, {**info, "settings": other_settings})


def test_missing_world_is_a_clear_error(tmp_path):
    with pytest.raises(WorldError, match="no world in"):
        load_world(tmp_path)
    with pytest.raises(WorldError, match="unknown world preset"):
        ensure_world(tmp_path, preset="huge")


def test_world_path_command(capsys):
    assert ganrm_main(["world", "path"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(default_world_dir())
    assert printed.startswith(os.environ["GANRM_HOME"])  # the test session's private cache


@pytest.mark.parametrize("argv", [["world", "--help"], ["world", "build", "--help"], ["world", "path", "--help"]])
def test_world_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ganrm_main(argv)
    assert exit_info.value.code == 0
    assert "world" in capsys.readouterr().out
