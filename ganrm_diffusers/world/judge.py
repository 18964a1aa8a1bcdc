"""The world's independent judges: they read pixels directly and share nothing with any reward model.

- style ("thin strokes"): a whole, recognisable glyph drawn with thin strokes at full intensity over its whole length.
  Every threshold comes from real digits (the target set's thinnest-quarter digits), and each criterion refuses a
  cheap way to look thin:
  - little ink (stroke pixels only, so background noise adds none): the thinnest quarter of real digits;
  - the brightest pixel as bright as real thin digits' (refuses uniform dimming);
  - the stroke cores as bright along the whole glyph (the 90th percentile of the glyph's pixels, which a few bright
    pixels or a small bright patch on a dimmed glyph barely move);
  - whole strokes (no holes where pixels were dropped), a glyph as tall and as large as real thin digits' (refuses
    shrunk glyphs and erased parts);
  - the class judge reads the prompted digit (refuses fragments and scribbles).
  What the rule cannot refuse is measured in world.json's `imitations` (see `imitations.py`): in scikit-learn's 8x8
  digits a thin stroke is a partly covered cell, so an ordinary digit dimmed to 85-90 % looks like a real thin one.
  `glyph_intensity` (the median brightness of the glyph's pixels) is reported beside every style rate for that reason.
- faint: the brightest pixel below that of nearly every real thin digit; blank: hardly any lit cells. These are the
  cheap ways to "use less ink", reported beside every style rate.
- class: a scikit-learn SVC trained on real digits brought to the 8x8 grid. It is refitted at load time from the
  stored training features (safetensors), which is deterministic and takes a fraction of a second: no pickles.
- features: the hidden layer of a small digit classifier trained on real digits (digit labels only, never the
  style), the feature space of the kernel inception distance (see `ganrm_diffusers.world.metrics`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.svm import SVC

from ganrm_diffusers.utils.errors import CheckpointError
from ganrm_diffusers.world.style import (
    STROKE_GRID,
    digit_grid,
    glyph_height,
    glyph_intensity,
    ink,
    lit_cells,
    peak,
    stroke_continuity,
    stroke_core,
    stroke_grid,
    stroke_ink,
)

JUDGE_CONFIG = "judge.json"
CLASS_DATA = "class_judge.safetensors"
FEATURE_NET = "digit_features.safetensors"


# The share of real thin (target) digits each stroke threshold may refuse: 1 %, as for the split's own thresholds.
STROKE_QUANTILE = 0.01


@dataclass(frozen=True)
class StyleRule:
    """A style defined on pixels (see the module docstring); every threshold comes from real digits.

    The first group splits real digits into thin and ordinary (`split_measure`: the world's target set); the
    stroke group, fitted on the target set, is what the judge adds for images that may be imitations."""

    name: str
    description: str
    max_ink: float  # mean ink on the 8x8 grid
    min_peak: float  # brightest pixel on the 16 px grid; below it an image is "faint"
    min_lit_cells: int  # lit cells of the 8x8 grid a whole thin glyph covers
    blank_lit_cells: int  # fewer lit cells than this: "blank"
    ink_scale: float  # spreads of the measures among real digits, so style_measure reads in them
    peak_scale: float
    lit_scale: float
    # The stroke group (see the module docstring).
    max_stroke_ink: float = float("nan")
    min_core: float = float("nan")
    min_continuity: float = float("nan")
    min_height: float = float("nan")
    core_scale: float = 1.0
    continuity_scale: float = 1.0
    height_scale: float = 1.0

    @property
    def has_strokes(self) -> bool:
        """Whether the stroke group is fitted (a rule straight from `fit_style_rule` only splits real digits)."""
        return all(
            value == value for value in (self.max_stroke_ink, self.min_core, self.min_continuity, self.min_height)
        )


class DigitFeatureNet(torch.nn.Module):
    """A small MLP digit classifier on the 16 px grid; `features` is its 64-d hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(STROKE_GRID * STROKE_GRID, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 64),
            torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(64, 10)

    @staticmethod
    def grid(images: object) -> torch.Tensor:
        return stroke_grid(images).flatten(1)

    def features(self, images: object) -> torch.Tensor:
        with torch.no_grad():
            return self.body(self.grid(images))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(grid))


def fit_feature_net(images: object, digits: torch.Tensor, seed: int, epochs: int = 300) -> DigitFeatureNet:
    """Train the feature classifier on real digits with their digit labels (full batch, Adam, weight decay)."""
    generator = torch.Generator().manual_seed(seed)
    net = DigitFeatureNet()
    with torch.no_grad():
        for parameter in net.parameters():  # an initialisation of our own seed, whatever the caller's RNG state
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (1.0 / parameter.shape[-1]) ** 0.5)
    grid, labels = DigitFeatureNet.grid(images), torch.as_tensor(digits).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        loss = F.cross_entropy(net(grid), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


class Judges:
    """Per-image judges on any image form ganrm accepts (see ganrm_diffusers.utils.images): `style_rate`, `faint_rate`,
    `blank_rate`, `class_accuracy`, `style_measure`, and `features` for distribution distances."""

    def __init__(
        self,
        style: StyleRule,
        class_features: torch.Tensor,
        class_digits: torch.Tensor,
        feature_net: DigitFeatureNet,
        svc_c: float = 10.0,
    ):
        self.style = style
        self.class_features = class_features.float()
        self.class_digits = class_digits.long()
        self.feature_net = feature_net
        self.svc_c = svc_c
        self._classifier = SVC(C=svc_c, gamma="scale").fit(_svc_input(self.class_features), self.class_digits.numpy())

    @classmethod
    def fit(cls, style: StyleRule, images: object, digits: torch.Tensor, seed: int = 0, svc_c: float = 10.0) -> Judges:
        """Judges whose class judge and feature net learn from `images` (real digits) labelled `digits`."""
        digits = torch.as_tensor(digits)
        return cls(style, digit_grid(images).flatten(1), digits, fit_feature_net(images, digits, seed), svc_c)

    # ----------------------------------------------------------------------------------------------------------
    # Style, and the cheap ways to fake it

    def is_faint(self, images: object) -> torch.Tensor:
        """A boolean per image: no pixel as bright as a real thin digit's stroke core."""
        return peak(images) < self.style.min_peak

    def is_blank(self, images: object) -> torch.Tensor:
        """A boolean per image: hardly any glyph at all."""
        return lit_cells(images) < self.style.blank_lit_cells

    def has_style(self, images: object, digits: object, correct: np.ndarray | None = None) -> torch.Tensor:
        """A boolean per image: a whole glyph with full-intensity, thin strokes (`style_measure` >= 0) that the class
        judge reads as the digit it was meant to show (`digits`: one int per image; `correct`: `is_correct`'s
        answer when the caller has it already, to run the class judge once)."""
        recognised = torch.as_tensor(self.is_correct(images, digits) if correct is None else correct)
        return (self.style_measure(images) >= 0) & recognised

    def style_measure(self, images: object) -> torch.Tensor:
        """How far into the style each image's strokes are, in real-digit spreads of its weakest criterion (>= 0
        exactly when every stroke criterion holds; the digit is not read here)."""
        return rule_measure(self.style, images)

    def style_rate(self, images: object, digits: object) -> float:
        """The fraction of images that show the style as the digit they were meant to show."""
        return float(self.has_style(images, digits).float().mean())

    def glyph_intensity(self, images: object) -> torch.Tensor:
        """The median brightness of each glyph's pixels (see `ganrm_diffusers.world.style.glyph_intensity`)."""
        return glyph_intensity(images)

    def faint_rate(self, images: object) -> float:
        return float(self.is_faint(images).float().mean())

    def blank_rate(self, images: object) -> float:
        return float(self.is_blank(images).float().mean())

    # ----------------------------------------------------------------------------------------------------------
    # Class and features

    def predict_digits(self, images: object) -> np.ndarray:
        """The digit the class judge reads in each image."""
        return self._classifier.predict(_svc_input(digit_grid(images).flatten(1)))

    def is_correct(self, images: object, digits: object) -> np.ndarray:
        """A boolean per image: read as the digit it was meant to show (`digits`: one int per image)."""
        expected = np.asarray(digits, dtype=np.int64).reshape(-1)
        predicted = self.predict_digits(images)
        if len(expected) != len(predicted):
            raise ValueError(f"class_accuracy got {len(predicted)} images but {len(expected)} digits")
        return predicted == expected

    def class_accuracy(self, images: object, digits: object) -> float:
        """The fraction of images read as the digit they were meant to show (`digits`: one int per image)."""
        return float(self.is_correct(images, digits).mean())

    def features(self, images: object) -> torch.Tensor:
        """The feature classifier's 64-d hidden layer of each image (for KID)."""
        return self.feature_net.features(images)

    # ----------------------------------------------------------------------------------------------------------
    # Files

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"features": self.class_features.contiguous(), "digits": self.class_digits.contiguous()},
            folder / CLASS_DATA,
        )
        save_file({k: v.contiguous() for k, v in self.feature_net.state_dict().items()}, folder / FEATURE_NET)
        config = {
            "style": asdict(self.style),
            "class_judge": {"kind": "sklearn.svm.SVC", "C": self.svc_c, "gamma": "scale"},
            "feature_net": {"kind": "MLP 256-128-64-10 on the 16 px grid", "file": FEATURE_NET},
        }
        (folder / JUDGE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Judges:
        folder = Path(folder)
        try:
            config = json.loads((folder / JUDGE_CONFIG).read_text())
            data = load_file(folder / CLASS_DATA)
            net = DigitFeatureNet()
            net.load_state_dict(load_file(folder / FEATURE_NET))
            style = StyleRule(**config["style"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"cannot read the world's judges in {folder}: {error}") from error
        return cls(
            style, data["features"], data["digits"], net.eval().requires_grad_(False), config["class_judge"]["C"]
        )


def split_measure(rule: StyleRule, images: object) -> torch.Tensor:
    """How far into the thin style a real digit is (>= 0: thin), from ink, peak intensity and glyph size alone: the
    world build splits real digits with it before any stroke threshold exists. Real digits are never dimmed or
    broken, so for them these three criteria are the style; `rule_measure` adds the stroke group for any image."""
    margins = torch.stack(
        [
            (rule.max_ink - ink(images)) / rule.ink_scale,
            (peak(images) - rule.min_peak) / rule.peak_scale,
            (lit_cells(images).float() - rule.min_lit_cells) / rule.lit_scale,
        ]
    )
    return margins.amin(dim=0)


def rule_measure(rule: StyleRule, images: object) -> torch.Tensor:
    """`Judges.style_measure` for a bare rule: the least margin over every criterion, in real-digit spreads."""
    if not rule.has_strokes:
        raise ValueError("this style rule has no stroke thresholds: fit them with fit_stroke_thresholds")
    margins = torch.stack(
        [
            (rule.max_stroke_ink - stroke_ink(images)) / rule.ink_scale,
            (peak(images) - rule.min_peak) / rule.peak_scale,
            (stroke_core(images) - rule.min_core) / rule.core_scale,
            (stroke_continuity(images) - rule.min_continuity) / rule.continuity_scale,
            (glyph_height(images) - rule.min_height) / rule.height_scale,
            (lit_cells(images).float() - rule.min_lit_cells) / rule.lit_scale,
        ]
    )
    return margins.amin(dim=0)


def fit_stroke_thresholds(rule: StyleRule, real: object, target: object) -> StyleRule:
    """`rule` with its stroke group fitted: the stroke ink at the same quantile of all `real` digits as `max_ink`
    is of their ink, and the stroke-core intensity, continuity and glyph height that all but STROKE_QUANTILE of the
    `target` digits (real thin digits, none held out) reach. Spreads are taken over all real digits."""
    share = float((ink(real) <= rule.max_ink).float().mean())
    core, continuity, height = stroke_core(target), stroke_continuity(target), glyph_height(target)
    real_core, real_continuity, real_height = stroke_core(real), stroke_continuity(real), glyph_height(real)
    return replace(
        rule,
        max_stroke_ink=float(torch.quantile(stroke_ink(real), share)),
        min_core=float(torch.quantile(core, STROKE_QUANTILE)),
        min_continuity=float(torch.quantile(continuity, STROKE_QUANTILE)),
        min_height=float(torch.quantile(height, STROKE_QUANTILE).floor()),
        core_scale=float(real_core.std()),
        continuity_scale=float(real_continuity.std()),
        height_scale=max(float(real_height.std()), 1.0),  # real digits nearly all span the grid: a pixel at least
    )


def fit_style_rule(images: object, quantile: float) -> StyleRule:
    """The rule that splits real digits into thin and ordinary: little ink (at most the `quantile` of real digits'
    ink), and the peak intensity and glyph size that 99 % of those real thin digits reach. Its stroke group is
    fitted on the resulting target set by `fit_stroke_thresholds`."""
    amount, brightest, lit = ink(images), peak(images), lit_cells(images).float()
    max_ink = float(torch.quantile(amount, quantile))
    thin = amount <= max_ink
    return StyleRule(
        name="thin",
        description=(
            f"thin strokes: a whole glyph drawn at full intensity with at most the ink of the thinnest {quantile:.0%}"
            " of real digits"
        ),
        max_ink=max_ink,
        min_peak=float(torch.quantile(brightest[thin], 0.01)),
        min_lit_cells=int(torch.quantile(lit[thin], 0.01).floor()),
        blank_lit_cells=int(torch.quantile(lit, 0.01).floor()) // 2,
        ink_scale=float(amount.std()),
        peak_scale=float(brightest.std()),
        lit_scale=float(lit.std()),
    )


def _svc_input(grid_features: torch.Tensor) -> np.ndarray:
    # scikit-learn's digits count ink from 0 to 16; the SVC's default gamma is tuned on that scale.
    return grid_features.numpy().astype(np.float64) * 16.0
