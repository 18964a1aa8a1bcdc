"""The embedded digits world: a small text-to-image world, built on a CPU in minutes, where GAN-RM can be measured.

No real CLIP or Stable Diffusion weights can be downloaded everywhere, so ganrm builds its own world from
scikit-learn's bundled digits (1797 images of 8x8, no download), deterministically from a seed:

- `pipeline/`: a Stable-Diffusion-shaped text-to-image model (AutoencoderKL, UNet2DConditionModel, a frozen
  CLIPTextModel, the real CLIP tokenizer, DDIM) trained on prompts "a handwritten digit 7". It loads with
  `StableDiffusionPipeline.from_pretrained(world.pipeline_dir)` and draws 16 px RGB digits; sample it with
  `pipe(prompt, **world.sampling_kwargs)` (the recommended guidance scale and number of steps).
- `pipeline_flow/`: a second generator, Stable-Diffusion-3-shaped and trained by rectified flow (SD3Transformer2DModel,
  two CLIPTextModelWithProjection holding the same frozen CLIP text tower, no T5, the real CLIP tokenizer,
  FlowMatchEulerDiscreteScheduler) on the same digits and in the same autoencoder's latents (see
  `ganrm_diffusers.world.flow_generator`). It loads with plain diffusers, `StableDiffusion3Pipeline.from_pretrained(
  world.flow_pipeline_dir, text_encoder_3=None, tokenizer_3=None)` or `world.load_flow_pipeline()`; sample it with
  `pipe(prompt, **world.flow_sampling_kwargs)`, which include the number of zero T5 rows it was trained with
  (`max_sequence_length`; the pipeline's default, 256, is not what it saw).
- `clip/`: a tiny open_clip model trained on captions that name the digit, its slant, glyph height and horizontal
  position, never its ink or stroke weight (it was never told the style), in open_clip's local-dir format: `open_clip.create_model_and_transforms(world.backbone)` with `world.backbone ==
  "local-dir:<world>/clip"`. It is the world's GAN-RM backbone: `GANRewardModel(backbone=world.backbone)`.
- The target style, "thin": a whole, recognisable glyph drawn at full intensity along its strokes with at most the
  ink of the thinnest quarter of real digits (faint, dimmed, broken, shrunk or partial digits do not count; what
  the judge cannot refuse is audited in world.json's `imitations`). The base model draws it rarely. `target/` holds a few hundred real thin digits (the preference proxy data) as PNG;
  `heldout/target/` and `heldout/other/` hold real digits with and without the style that no model saw.
- `judge/`: judges that share nothing with the reward model: `world.judges.style_rate(images, digits)`,
  `faint_rate`, `blank_rate`, `glyph_intensity(images)`, `style_measure(images)` (continuous, >= 0 exactly when
  an image's strokes have the style; `has_style` also asks the class judge to read the prompted digit),
  `class_accuracy(images, digits)` and `features(images)` (a digit classifier's hidden layer, for KID; see
  `ganrm_diffusers.world.metrics`). Images: float NCHW / NHWC in [0, 1], uint8, or PIL.
- `world.json`: seed, settings, build_seconds, phase_seconds, figures (class_accuracy, style_rate, faint_rate,
  blank_rate and the median glyph intensity of the base samples of each generator, "base" and "base_flow", of
  held-out target digits and of held-out other digits) and `imitations` (the style judge's audit, imitations.py).

API:
    build_world(out_dir=None, seed=0, preset="full") -> Path     # preset "reduced": seconds, for tests
    default_world_dir() -> Path                                  # <ganrm cache>/world; $GANRM_HOME overrides
    load_world(path=None) -> World                               # WorldError if missing or outdated
    ensure_world(path=None, seed=0, preset="full") -> World      # builds (or upgrades) first when needed
    upgrade_world(path=None) -> Path                             # formats 2-4 in place: judges refitted (2-3: + flow)
    World: root, pipeline_dir, flow_pipeline_dir, clip_dir, backbone, target_dir, heldout_target_dir,
           heldout_other_dir, prompts, prompt_digits, sampling_kwargs, flow_sampling_kwargs, seed, info (world.json),
           judges, load_pipeline(**kwargs), load_flow_pipeline(**kwargs),
           target_images(), heldout_target_images(), heldout_other_images()  -> (NCHW floats, digits)
    build_clip_tokenizer() -> transformers.CLIPTokenizer         # the real CLIP BPE, offline

A world of the previous format (2: no pipeline_flow/) built with the same seed and preset is upgraded in place by
`ensure_world` and `ganrm world build`: only the flow generator is trained, and the result is the world a full build
gives; `load_world` refuses it with a WorldError that names the command.

CLI: `ganrm world build [--out DIR] [--seed N] [--reduced] [--rebuild]`, `ganrm world path`.
"""

from __future__ import annotations

import importlib

# Imported lazily: `ganrm --help` and `ganrm_diffusers.world.tokenizer` should not pay for diffusers and scikit-learn.
_EXPORTS = {
    "World": "ganrm_diffusers.world.build",
    "WorldError": "ganrm_diffusers.world.build",
    "WorldSettings": "ganrm_diffusers.world.build",
    "build_world": "ganrm_diffusers.world.build",
    "default_world_dir": "ganrm_diffusers.world.build",
    "ensure_world": "ganrm_diffusers.world.build",
    "load_world": "ganrm_diffusers.world.build",
    "read_digit_folder": "ganrm_diffusers.world.build",
    "upgrade_world": "ganrm_diffusers.world.build",
    "Judges": "ganrm_diffusers.world.judge",
    "StyleRule": "ganrm_diffusers.world.judge",
    "build_clip_tokenizer": "ganrm_diffusers.world.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ganrm_diffusers.world' has no attribute {name!r}")
