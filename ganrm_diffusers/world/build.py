"""Building the world from a seed, and loading it back.

Layout of a world folder:
    world.json              seed, settings, split sizes, build_seconds, phase_seconds, sampling and flow_sampling,
                            figures (base / base_flow / target / real_other), imitations (the style judge's audit)
    pipeline/               StableDiffusionPipeline.from_pretrained(<world>/pipeline)
    pipeline_flow/          StableDiffusion3Pipeline.from_pretrained(<world>/pipeline_flow, text_encoder_3=None,
                            tokenizer_3=None): the SD3-shaped flow-matching generator on pipeline/'s autoencoder
    clip/                   open_clip local-dir: open_clip_config.json + open_clip_model.safetensors
    judge/                  judge.json + class_judge.safetensors (the class judge is refitted at load time)
    target/                 the target set ("preference proxy data"): real thin-stroke digits as PNG
    heldout/target/         real thin-stroke digits kept out of every training, for evaluation
    heldout/other/          real digits without the style, kept out of every training, for evaluation
    preview.png             base samples per prompt beside real target digits, for a person to look at
    preview_flow.png        the same for the flow-matching generator

A world of a previous format with the same seed and settings is upgraded in place by `build_world` (so by
`ensure_world` and `ganrm world build`): its judges are refitted from the real digits and its generators judged
again; where its flow generator is missing or outdated, it is trained from the CLIP and the autoencoder on disk,
which a full build also reads back before training it, so both give the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from ganrm_diffusers.utils.errors import GanrmError
from ganrm_diffusers.utils.images import load_image, to_pil, to_pixels
from ganrm_diffusers.utils.paths import cache_dir
from ganrm_diffusers.world import clip_training, flow_generator, generator
from ganrm_diffusers.world.imitations import judge_audit
from ganrm_diffusers.world.judge import Judges, StyleRule, fit_stroke_thresholds, fit_style_rule, split_measure
from ganrm_diffusers.world.style import RealDigits, glyph_box, load_real_digits, slant
from ganrm_diffusers.world.style import ink as ink_of
from ganrm_diffusers.world.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

WORLD_FILE = "world.json"
# Bumped whenever the build changes what a seed produces: a world of another format is rebuilt by ensure_world,
# except a world of an UPGRADABLE_FORMATS, which is upgraded in place (upgrade_world).
# 2: the style judge reads the glyph (not ink alone); the CLIP never sees ink words. 3: pipeline_flow/. 4: the flow
# generator trains 600 steps (900 before) and is judged on 30 samples per prompt: about 2.7 minutes less to build.
# 5: the style judge reads strokes (core intensity along the glyph, continuity, height, the digit recognised) and
# world.json holds its audit against cheap imitations; the split of real digits and every trained weight are as in 4.
FORMAT_VERSION = 5
# 2 has no flow generator, 3 one of 900 steps; 2, 3 and 4 have the judges of before. Everything else is the same.
UPGRADABLE_FORMATS = (2, 3, 4)
FLOW_OUTDATED_FORMATS = (2, 3)
FLOW_SETTINGS_PREFIX = "flow_"  # only these settings differ between an upgradable world and this ganrm's
STYLE_QUANTILE = 0.25  # "thin": at most the ink of the thinnest quarter of real digits
# The flow generator's guidance: the smallest whose base class accuracy is within a point of the best in a sweep
# (world seed 0, full preset, 500 samples, 25 steps; 2026-12-02): guidance 1.0 / 1.5 / 2.0 / 2.5 / 3.0 / 4.0 gave
# class accuracy 0.918 / 0.984 / 0.992 / 0.998 / 0.998 / 0.998 and style rate 0.098 / 0.042 / 0.020 / 0.008 /
# 0.006 / 0.004. More guidance buys no accuracy and makes the target style rarer still. (That sweep was of the
# 900-step generator of format 3; the 600-step one draws class accuracy 0.987 and style rate 0.053 at 2.0.)
FLOW_GUIDANCE_SCALE = 2.0
PRESETS = ("full", "reduced")


class WorldError(GanrmError, ValueError):
    """A world folder that is missing, incomplete, or was built by another version of ganrm."""


@dataclass(frozen=True)
class WorldSettings:
    """Everything a build depends on besides the seed. `preset("full")` is the world; "reduced" is for tests."""

    preset: str = "full"
    image_size: int = 16
    threads: int = 2  # torch CPU results depend on the thread count: fixed, so a seed always gives the same weights
    heldout_target: int = 100
    heldout_other: int = 300
    vae_steps: int = 200
    vae_batch_size: int = 128
    vae_learning_rate: float = 2e-3
    unet_channels: tuple[int, ...] = (32, 64)
    unet_steps: int = 900
    unet_batch_size: int = 128
    unet_learning_rate: float = 1e-3
    ema_decay: float = 0.995
    # The generator learns only from digits with more ink than this quantile of real digits (the style is below
    # 0.25), so it draws thin strokes rarely, as a real base model rarely draws what its data seldom shows.
    generator_ink_quantile: float = 0.25
    clip_steps: int = 300
    clip_batch_size: int = 256
    clip_learning_rate: float = 1e-3
    clip_embed_dim: int = 64
    clip_vision_width: int = 64
    clip_vision_layers: int = 3
    clip_patch_size: int = 4
    clip_image_size: int = 32
    guidance_scale: float = 2.0
    num_inference_steps: int = 25
    figure_samples_per_prompt: int = 50
    # The flow-matching generator (flow_generator.py): an SD3Transformer2DModel of about 2.3 M parameters.
    flow_layers: int = 4
    flow_heads: int = 4
    flow_head_dim: int = 32
    flow_pos_embed_max_size: int = 16
    # CLIP tokens per prompt, and as many zero T5 rows (the pipeline's max_sequence_length): the world's prompts are 6
    # tokens, and every text token costs the joint attention and the MLPs as much as a latent pixel does.
    flow_text_tokens: int = 8
    # 0.3-0.4 s a step of 64 on 2 idle cores (0.84 s at batch 128). 600 steps (3-4 minutes): class accuracy 0.987
    # and style rate 0.053 on its figure samples (world seed 0), where 900 steps (format 3) drew 0.992 and 0.020:
    # within 3 points of the UNet generator's 0.984 either way, and a third of its training off `make demo`'s budget.
    flow_steps: int = 600
    flow_batch_size: int = 64
    flow_learning_rate: float = 1e-3
    flow_shift: float = 1.0
    flow_guidance_scale: float = FLOW_GUIDANCE_SCALE
    flow_num_inference_steps: int = 25
    flow_figure_samples_per_prompt: int = 30  # 300 judged samples for world.json's base_flow figures

    @classmethod
    def preset_named(cls, name: str) -> WorldSettings:
        if name == "full":
            return cls()
        if name == "reduced":
            # The same code paths in seconds: few steps, small batches, a small evaluation.
            return cls(
                preset="reduced",
                heldout_target=20,
                heldout_other=40,
                vae_steps=8,
                vae_batch_size=32,
                unet_steps=8,
                unet_batch_size=32,
                clip_steps=8,
                clip_batch_size=64,
                num_inference_steps=4,
                figure_samples_per_prompt=2,
                flow_steps=8,
                flow_batch_size=32,
                flow_num_inference_steps=4,
                flow_figure_samples_per_prompt=2,
            )
        raise WorldError(f"unknown world preset {name!r} (expected 'full' or 'reduced')")


@dataclass
class World:
    """A built world: where its parts are, its judges, its prompts and how to sample from it."""

    root: Path
    info: dict
    judges: Judges = field(repr=False)

    @property
    def pipeline_dir(self) -> Path:
        return self.root / "pipeline"

    @property
    def clip_dir(self) -> Path:
        return self.root / "clip"

    @property
    def backbone(self) -> str:
        """The open_clip name of the world's CLIP, for GANRewardModel(backbone=...) or `--backbone`."""
        return f"local-dir:{self.clip_dir}"

    @property
    def target_dir(self) -> Path:
        return self.root / "target"

    @property
    def heldout_target_dir(self) -> Path:
        return self.root / "heldout" / "target"

    @property
    def heldout_other_dir(self) -> Path:
        return self.root / "heldout" / "other"

    @property
    def prompts(self) -> list[str]:
        return list(self.info["prompts"])

    @property
    def prompt_digits(self) -> list[int]:
        """The digit each prompt asks for (same order as `prompts`)."""
        return list(self.info["prompt_digits"])

    @property
    def sampling_kwargs(self) -> dict:
        """The recommended pipeline arguments: `pipe(prompt, **world.sampling_kwargs)`."""
        return dict(self.info["sampling"])

    @property
    def flow_pipeline_dir(self) -> Path:
        return self.root / "pipeline_flow"

    @property
    def flow_sampling_kwargs(self) -> dict:
        """The flow pipeline's recommended arguments: `pipe(prompt, **world.flow_sampling_kwargs)`. They include
        max_sequence_length, the zero T5 rows it was trained with (the pipeline's own default is 256)."""
        return dict(self.info["flow_sampling"])

    @property
    def seed(self) -> int:
        return int(self.info["seed"])

    def load_pipeline(self, **kwargs: object) -> StableDiffusionPipeline:
        return StableDiffusionPipeline.from_pretrained(self.pipeline_dir, **kwargs)

    def load_flow_pipeline(self, **kwargs: object) -> StableDiffusion3Pipeline:
        """The SD3-shaped pipeline, with plain diffusers: it has no T5, which from_pretrained must be told."""
        return StableDiffusion3Pipeline.from_pretrained(
            self.flow_pipeline_dir, text_encoder_3=None, tokenizer_3=None, **kwargs
        )

    def target_images(self) -> tuple[torch.Tensor, list[int]]:
        """The target set as NCHW floats in [0, 1], with each image's digit."""
        return read_digit_folder(self.target_dir)

    def heldout_target_images(self) -> tuple[torch.Tensor, list[int]]:
        return read_digit_folder(self.heldout_target_dir)

    def heldout_other_images(self) -> tuple[torch.Tensor, list[int]]:
        return read_digit_folder(self.heldout_other_dir)


# --------------------------------------------------------------------------------------------------------------
# Where worlds live


def default_world_dir() -> Path:
    """The world `ganrm world build` writes and `make demo` uses: <ganrm cache>/world ($GANRM_HOME overrides)."""
    return cache_dir() / "world"


def load_world(path: str | Path | None = None) -> World:
    root = Path(path) if path is not None else default_world_dir()
    info_file = root / WORLD_FILE
    if not info_file.is_file():
        raise WorldError(f"no world in {root} (run `ganrm world build --out {root}`)")
    info = json.loads(info_file.read_text())
    if _upgradable(root, info):
        raise WorldError(
            f"the world in {root} has format {info['format_version']}, this ganrm reads format {FORMAT_VERSION}:"
            f" upgrade it with `ganrm world build --out {root}{_seed_and_preset_options(info)}` (it refits the judges"
            " and judges the generators again, about a minute; a world of format 2 or 3 also has its flow-matching"
            " generator trained, minutes)"
        )
    if info.get("format_version") != FORMAT_VERSION:
        raise WorldError(
            f"the world in {root} has format {info.get('format_version')}, this ganrm builds format {FORMAT_VERSION}:"
            f" rebuild it with `ganrm world build --out {root}`"
        )
    return World(root=root, info=info, judges=Judges.load(root / "judge"))


def _seed_and_preset_options(info: dict) -> str:
    """The `ganrm world build` options that rebuild the world `info` describes (empty for the defaults)."""
    options = f" --seed {info['seed']}" if info.get("seed", 0) != 0 else ""
    return options + (" --reduced" if info.get("settings", {}).get("preset") == "reduced" else "")


def ensure_world(path: str | Path | None = None, seed: int = 0, preset: str = "full") -> World:
    """Load the world at `path` (default: default_world_dir()), building it first if it is missing or was built
    with another seed, preset or format (a world of the previous format and the same seed and preset is upgraded
    in place, see build_world)."""
    root = Path(path) if path is not None else default_world_dir()
    try:
        world = load_world(root)
        if world.seed == seed and world.info["settings"]["preset"] == preset:
            return world
        logger.warning("the world in %s was built with other settings; rebuilding it", root)
    except WorldError:
        pass
    return load_world(build_world(root, seed=seed, preset=preset))


# --------------------------------------------------------------------------------------------------------------
# Building


def build_world(
    out_dir: str | Path | None = None, seed: int = 0, preset: str = "full", *, rebuild: bool = False
) -> Path:
    """Build the world deterministically from `seed` into `out_dir` (default: default_world_dir()); returns it.

    The world is assembled in a temporary folder beside `out_dir` and moved into place at the end, so an
    interrupted build never leaves a world that looks complete. An existing world at `out_dir` is replaced, except
    one of the previous format built from the same seed and settings: unless `rebuild`, it is upgraded in place
    (see upgrade_world), which gives the same world in a fraction of the time.
    """
    settings = WorldSettings.preset_named(preset)
    out_dir = Path(out_dir) if out_dir is not None else default_world_dir()
    if not rebuild and _upgradable(out_dir, _read_info(out_dir), seed, settings):
        return upgrade_world(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    try:
        with _deterministic_torch(settings.threads):
            info = _build_into(staging, seed, settings)
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        (staging / WORLD_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("world built in %s (%.0f s)", out_dir, info["build_seconds"])
    return out_dir


@contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed thread count and a private RNG stream, restored afterwards (the caller's RNG state is untouched)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(previous_threads)


class _Laps:
    """Seconds spent in each phase of a build, for world.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 1)
        self._last = now


@dataclass
class _Data:
    """The real digits and how a seed splits them: everything a build (or an upgrade) derives before training."""

    real: RealDigits
    style: StyleRule
    split: dict
    heavier: np.ndarray  # the generators' training digits


def _prepare_data(seed: int, settings: WorldSettings) -> _Data:
    real = load_real_digits(settings.image_size)
    ink = ink_of(real.pixels())
    style = fit_style_rule(real.pixels(), STYLE_QUANTILE)
    # Targets have the whole style; "ordinary" digits are clearly not thin. The few thin-by-ink digits that miss the
    # style's other criteria (a faint or broken real glyph) belong to neither and are left out.
    split = _split(
        real, split_measure(style, real.pixels()) >= 0, ink > style.max_ink, settings, np.random.RandomState(seed)
    )
    # The judge's stroke thresholds come from the target set only: held-out thin digits test them.
    style = fit_stroke_thresholds(style, real.pixels(), real.pixels(split["target"]))
    heavier = split["ordinary"][(ink[split["ordinary"]] > torch.quantile(ink, settings.generator_ink_quantile)).numpy()]
    return _Data(real=real, style=style, split=split, heavier=heavier)


def _build_into(root: Path, seed: int, settings: WorldSettings) -> dict:
    lap = _Laps()
    data = _prepare_data(seed, settings)
    real, style, split, heavier = data.real, data.style, data.split, data.heavier
    training = np.concatenate([split["target"], split["ordinary"]])

    _write_digit_folder(root / "target", real, split["target"])
    _write_digit_folder(root / "heldout" / "target", real, split["heldout_target"])
    _write_digit_folder(root / "heldout" / "other", real, split["heldout_other"])

    judges = _fit_judges(data, seed)
    judges.save(root / "judge")

    torch.manual_seed(seed)
    clip_config = clip_training.clip_config(
        settings.clip_image_size,
        settings.clip_embed_dim,
        settings.clip_vision_width,
        settings.clip_vision_layers,
        settings.clip_patch_size,
    )
    lap("data_and_judges")
    clip = clip_training.train_clip(
        root / "clip",
        clip_config,
        real.pixels(training),
        _captions(real, training),
        steps=settings.clip_steps,
        batch_size=settings.clip_batch_size,
        learning_rate=settings.clip_learning_rate,
        generator=torch.Generator().manual_seed(seed + 1),
    )

    lap("clip")

    pipe = _train_generator(real, heavier, clip, seed, settings)
    pipe.save_pretrained(root / "pipeline", safe_serialization=True)
    lap("generator")

    prompts = [generator.prompt_for(digit) for digit in range(10)]
    sampling = {"guidance_scale": settings.guidance_scale, "num_inference_steps": settings.num_inference_steps}
    base_pixels, base_digits = _sample_base(pipe, prompts, sampling, settings.figure_samples_per_prompt, seed)
    _write_preview(
        root / "preview.png", base_pixels, base_digits, real.pixels(split["target"]), real.digits[split["target"]]
    )

    figures = {"base": _figures(judges, base_pixels, base_digits), **_real_figures(judges, data)}
    info = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "settings": asdict(settings),
        "style": asdict(style),
        "clip_captions": clip_training.CAPTION_TEMPLATE,
        "prompts": prompts,
        "prompt_digits": list(range(10)),
        "sampling": sampling,
        "sizes": {**{name: len(indices) for name, indices in split.items()}, "generator_training": len(heavier)},
        "figures": figures,
        "imitations": _audit(judges, data),
    }
    lap("figures")
    flow = _build_flow_into(root, data, judges, seed, settings, lap)
    info["flow_sampling"] = flow["sampling"]
    info["figures"] = {"base": figures["base"], "base_flow": flow["figures"], **figures}
    return {**info, "phase_seconds": lap.seconds}


def _fit_judges(data: _Data, seed: int) -> Judges:
    """The judges of a world: the style rule of `data`, the class judge and feature net fitted on its training
    digits (the target set and the ordinary ones; never the held-out digits)."""
    training = np.concatenate([data.split["target"], data.split["ordinary"]])
    return Judges.fit(data.style, data.real.pixels(training), data.real.digits[training], seed=seed)


def _real_figures(judges: Judges, data: _Data) -> dict:
    """The judges' figures on held-out real digits, and on the other ones dimmed (less ink is not thinner strokes)."""
    real, split = data.real, data.split
    other, other_digits = real.pixels(split["heldout_other"]), real.digits[split["heldout_other"]]
    return {
        "target": _figures(judges, real.pixels(split["heldout_target"]), real.digits[split["heldout_target"]]),
        "real_other": _figures(judges, other, other_digits),
        **{
            f"real_other_dimmed_{factor}": _figures(judges, other * factor, other_digits)
            for factor in (0.9, 0.8, 0.7, 0.5)
        },
    }


def _audit(judges: Judges, data: _Data) -> dict:
    """The judge against cheap imitations of held-out ordinary digits, and on held-out thin digits (imitations.py)."""
    real, split = data.real, data.split
    return judge_audit(
        judges,
        real.pixels(split["heldout_other"]),
        real.digits[split["heldout_other"]],
        real.pixels(split["heldout_target"]),
        real.digits[split["heldout_target"]],
    )


# --------------------------------------------------------------------------------------------------------------
# The flow-matching generator: the part format 3 added, built last by a full build and alone by an upgrade


def _build_flow_into(root: Path, data: _Data, judges: Judges, seed: int, settings: WorldSettings, lap: _Laps) -> dict:
    """Train the flow generator into root/pipeline_flow, sample and judge it; its sampling kwargs and figures."""
    pipe = _train_flow_generator(root, data.real, data.heavier, seed, settings)
    shutil.rmtree(root / "pipeline_flow", ignore_errors=True)  # what an interrupted upgrade left
    pipe.save_pretrained(root / "pipeline_flow", safe_serialization=True)
    lap("flow_generator")
    return _judge_flow(root, pipe, data, judges, seed, settings, lap)


def _judge_flow(
    root: Path,
    pipe: StableDiffusion3Pipeline,
    data: _Data,
    judges: Judges,
    seed: int,
    settings: WorldSettings,
    lap: _Laps,
) -> dict:
    """Sample the flow generator's figure samples, draw its preview and judge them: its sampling kwargs and figures."""
    prompts = [generator.prompt_for(digit) for digit in range(10)]
    sampling = {
        "guidance_scale": settings.flow_guidance_scale,
        "num_inference_steps": settings.flow_num_inference_steps,
        "max_sequence_length": settings.flow_text_tokens,
    }
    pixels, digits = _sample_base(
        pipe, prompts, sampling, settings.flow_figure_samples_per_prompt, seed, desc="world: flow base samples"
    )
    target = data.split["target"]
    _write_preview(root / "preview_flow.png", pixels, digits, data.real.pixels(target), data.real.digits[target])
    lap("flow_figures")
    return {"sampling": sampling, "figures": _figures(judges, pixels, digits)}


def _train_flow_generator(
    root: Path, real: RealDigits, indices: np.ndarray, seed: int, settings: WorldSettings
) -> StableDiffusion3Pipeline:
    """The CLIP and the autoencoder are read back from `root`, where a full build has just written them and where
    an upgrade finds them: both train from the very same numbers."""
    tokenizer = build_clip_tokenizer(model_max_length=settings.flow_text_tokens)
    text_encoder = clip_training.text_encoder_with_projection_from_clip(
        clip_training.load_clip(root / "clip"), tokenizer
    )
    pixels = real.pixels(indices)
    vae = flow_generator.flow_vae(AutoencoderKL.from_pretrained(root / "pipeline" / "vae").eval(), pixels)
    latent_size = settings.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed + 5)
    transformer = flow_generator.build_transformer(
        latent_size,
        # encode_prompt sets SD3's two CLIP encoders side by side: twice the width, twice the projection.
        2 * text_encoder.config.hidden_size,
        2 * text_encoder.config.projection_dim,
        flow_generator.TransformerShape(
            settings.flow_layers, settings.flow_heads, settings.flow_head_dim, settings.flow_pos_embed_max_size
        ),
    )
    pipe = flow_generator.assemble_pipeline(vae, text_encoder, tokenizer, transformer, settings.flow_shift)
    prompt_embeds, pooled_embeds = flow_generator.encode_prompts(
        pipe, [generator.prompt_for(digit) for digit in range(10)] + [""], settings.flow_text_tokens
    )
    flow_generator.train_transformer(
        transformer,
        flow_generator.encode_latents(vae, pixels),
        prompt_embeds,
        pooled_embeds,
        real.digits[indices],
        steps=settings.flow_steps,
        batch_size=settings.flow_batch_size,
        learning_rate=settings.flow_learning_rate,
        ema_decay=settings.ema_decay,
        generator=torch.Generator().manual_seed(seed + 6),
    )
    return pipe


def _without_flow_settings(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if not key.startswith(FLOW_SETTINGS_PREFIX)}


def _read_info(root: Path) -> dict:
    try:
        return json.loads((root / WORLD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _upgradable(root: Path, info: dict, seed: int | None = None, settings: WorldSettings | None = None) -> bool:
    """Whether `root` (whose world.json says `info`) holds a complete world of one of UPGRADABLE_FORMATS that this
    ganrm builds with these settings (the flow settings aside, which it has none of or older ones) from `seed`.
    Without `seed` and `settings`: from its own seed and preset."""
    if info.get("format_version") not in UPGRADABLE_FORMATS or info.get("settings", {}).get("preset") not in PRESETS:
        return False
    seed = info.get("seed") if seed is None else seed
    settings = WorldSettings.preset_named(info["settings"]["preset"]) if settings is None else settings
    wanted = json.loads(json.dumps(_without_flow_settings(asdict(settings))))  # tuples as JSON gives them back
    return (
        info.get("seed") == seed
        and _without_flow_settings(info["settings"]) == wanted
        and all((root / part).exists() for part in ("pipeline/vae", "clip", "judge", "target"))
    )


def upgrade_world(path: str | Path | None = None) -> Path:
    """Bring a world of one of UPGRADABLE_FORMATS to FORMAT_VERSION in place: refit the judges (seconds, from the
    real digits) and judge the generators again; a world of FLOW_OUTDATED_FORMATS also has its flow generator
    trained (replacing an older one). Besides those, judge/, preview_flow.png and world.json, every file stays as
    it is. The judges are staged beside judge/ and swapped in just before world.json is replaced (atomically), so
    an interrupted upgrade leaves a world of the old format, which is upgraded again next time."""
    root = Path(path) if path is not None else default_world_dir()
    info = _read_info(root)
    if not _upgradable(root, info):
        raise WorldError(
            f"the world in {root} cannot be upgraded (format {info.get('format_version')}; only a complete world of"
            f" format {' or '.join(map(str, UPGRADABLE_FORMATS))} built with this ganrm's settings can): rebuild it"
            f" with `ganrm world build --out {root} --rebuild`"
        )
    seed, settings = int(info["seed"]), WorldSettings.preset_named(info["settings"]["preset"])
    started = time.perf_counter()
    lap = _Laps()
    with _deterministic_torch(settings.threads):
        data = _prepare_data(seed, settings)
        judges = _fit_judges(data, seed)
        # The new judges are moved into place just before world.json: until then the world is wholly of its format.
        staged_judges = judges.save(root / f".judge.upgrading-{os.getpid()}")
        lap("data_and_judges")
        pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline")
        prompts = [generator.prompt_for(digit) for digit in range(10)]
        base_pixels, base_digits = _sample_base(
            pipe, prompts, info["sampling"], settings.figure_samples_per_prompt, seed
        )
        figures = {"base": _figures(judges, base_pixels, base_digits), **_real_figures(judges, data)}
        audit = _audit(judges, data)
        lap("figures")
        if info["format_version"] in FLOW_OUTDATED_FORMATS:
            flow = _build_flow_into(root, data, judges, seed, settings, lap)
        else:
            flow_pipe = StableDiffusion3Pipeline.from_pretrained(
                root / "pipeline_flow", text_encoder_3=None, tokenizer_3=None
            )
            flow = _judge_flow(root, flow_pipe, data, judges, seed, settings, lap)
    upgraded = {
        **info,
        "format_version": FORMAT_VERSION,
        "settings": asdict(settings),
        "style": asdict(data.style),
        "flow_sampling": flow["sampling"],
        "figures": {"base": figures["base"], "base_flow": flow["figures"], **figures},
        "imitations": audit,
        "phase_seconds": {**info.get("phase_seconds", {}), **{f"upgrade_{k}": v for k, v in lap.seconds.items()}},
        "build_seconds": round(info.get("build_seconds", 0) + time.perf_counter() - started, 1),
        "upgraded_from_format": info["format_version"],
    }
    staged = root / f".{WORLD_FILE}.upgrading-{os.getpid()}"
    staged.write_text(json.dumps(upgraded, indent=2) + "\n")
    shutil.rmtree(root / "judge")
    os.replace(staged_judges, root / "judge")
    os.replace(staged, root / WORLD_FILE)
    logger.info("world in %s upgraded to format %d (%.0f s)", root, FORMAT_VERSION, time.perf_counter() - started)
    return root


def _split(
    real: RealDigits,
    has_style: torch.Tensor,
    ordinary: torch.Tensor,
    settings: WorldSettings,
    rng: np.random.RandomState,
) -> dict:
    """Real digits with the style become the target set or held-out targets; ordinary ones are held out or train."""
    styled = rng.permutation(np.flatnonzero(has_style.numpy()))
    plain = rng.permutation(np.flatnonzero(ordinary.numpy()))
    return {
        "target": np.sort(styled[settings.heldout_target :]),
        "heldout_target": np.sort(styled[: settings.heldout_target]),
        "heldout_other": np.sort(plain[: settings.heldout_other]),
        "ordinary": np.sort(plain[settings.heldout_other :]),
    }


def _captions(real: RealDigits, indices: np.ndarray) -> list[str]:
    """Captions naming each digit and the tertiles of its slant, glyph height and horizontal position: attributes a
    person would name, none of them the amount of ink or the stroke weight."""

    def tertiles(values: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(values, torch.quantile(values, torch.tensor([1 / 3, 2 / 3])))

    height, centre = glyph_box(real.pixels())
    # Heights are whole pixels, so tertile edges tie: a tiny jitter of fixed seed splits ties evenly.
    jitter = torch.rand(len(height), generator=torch.Generator().manual_seed(0)) * 1e-3
    slant_bins, height_bins, position_bins = tertiles(slant(real.pixels())), tertiles(height + jitter), tertiles(centre)
    return [
        clip_training.caption(int(real.digits[i]), int(slant_bins[i]), int(height_bins[i]), int(position_bins[i]))
        for i in indices
    ]


def _train_generator(
    real: RealDigits, indices: np.ndarray, clip: torch.nn.Module, seed: int, settings: WorldSettings
) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    text_encoder = clip_training.text_encoder_from_clip(clip, tokenizer)
    torch.manual_seed(seed + 2)
    vae = generator.build_vae(settings.image_size)
    latent_size = settings.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = generator.build_unet(latent_size, settings.unet_channels, text_encoder.config.hidden_size)
    pixels = real.pixels(indices)
    generator.train_vae(
        vae,
        pixels,
        steps=settings.vae_steps,
        batch_size=settings.vae_batch_size,
        learning_rate=settings.vae_learning_rate,
        generator=torch.Generator().manual_seed(seed + 3),
    )
    prompts = [generator.prompt_for(digit) for digit in range(10)] + [""]
    generator.train_unet(
        unet,
        generator.encode(vae, pixels),
        generator.encode_prompts(text_encoder, tokenizer, prompts),
        real.digits[indices],
        steps=settings.unet_steps,
        batch_size=settings.unet_batch_size,
        learning_rate=settings.unet_learning_rate,
        ema_decay=settings.ema_decay,
        generator=torch.Generator().manual_seed(seed + 4),
    )
    return generator.assemble_pipeline(vae, text_encoder, tokenizer, unet)


def _sample_base(
    pipe: StableDiffusionPipeline | StableDiffusion3Pipeline,
    prompts: list[str],
    sampling: dict,
    per_prompt: int,
    seed: int,
    desc: str = "world: base samples",
) -> tuple[torch.Tensor, torch.Tensor]:
    pipe.set_progress_bar_config(disable=True)  # one bar over the prompts instead of one per pipeline call
    batches, digits = [], []
    for digit, prompt in enumerate(tqdm(prompts, desc=desc, leave=False)):
        output = pipe(
            prompt,
            num_images_per_prompt=per_prompt,
            generator=torch.Generator().manual_seed(seed * 1000 + digit),
            output_type="pt",
            **sampling,
        )
        batches.append(output.images)
        digits += [digit] * per_prompt
    return torch.cat(batches), torch.tensor(digits)


def _figures(judges: Judges, pixels: torch.Tensor, digits: torch.Tensor) -> dict:
    return {
        "class_accuracy": round(judges.class_accuracy(pixels, digits), 4),
        "style_rate": round(judges.style_rate(pixels, digits), 4),
        "faint_rate": round(judges.faint_rate(pixels), 4),
        "blank_rate": round(judges.blank_rate(pixels), 4),
        "glyph_intensity": round(float(judges.glyph_intensity(pixels).median()), 4),
        "count": len(digits),
    }


# --------------------------------------------------------------------------------------------------------------
# Digit folders: PNG files named <index>_digit<d>.png


_DIGIT_FILE = re.compile(r"_digit(\d)\.png$")


def _write_digit_folder(folder: Path, real: RealDigits, indices: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in zip(indices, to_pil(real.pixels(indices)), strict=True):
        image.save(folder / f"{int(index):04d}_digit{int(real.digits[index])}.png")


def read_digit_folder(folder: str | Path) -> tuple[torch.Tensor, list[int]]:
    """The images of a world digit folder as NCHW floats in [0, 1], with the digit each file name gives."""
    paths = sorted(Path(folder).glob("*_digit[0-9].png"))
    if not paths:
        raise WorldError(f"no digit images in {folder}")
    digits = [int(_DIGIT_FILE.search(path.name).group(1)) for path in paths]
    return to_pixels([load_image(path) for path in paths]), digits


def _write_preview(
    path: Path, base: torch.Tensor, base_digits: torch.Tensor, target: torch.Tensor, target_digits: torch.Tensor
) -> None:
    """One row per digit: base samples on the left, real target-style digits on the right."""
    columns = 8
    rows = []
    for digit in range(10):
        left = base[base_digits == digit][:columns]
        right = target[target_digits == digit][:columns]
        cells = [*left, *([torch.zeros_like(base[0])] * (columns - len(left))), torch.ones_like(base[0]) * 0.5]
        cells += [*right, *([torch.zeros_like(base[0])] * (columns - len(right)))]
        rows.append(torch.cat(cells, dim=2))
    grid = to_pil(torch.cat(rows, dim=1)[None])[0]
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)


__all__ = [
    "World",
    "WorldError",
    "WorldSettings",
    "build_world",
    "default_world_dir",
    "ensure_world",
    "load_world",
    "read_digit_folder",
    "upgrade_world",
]
