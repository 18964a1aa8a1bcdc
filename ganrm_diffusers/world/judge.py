"""The world's independent judges: they read pixels directly and share nothing with any reward model.

- style ("thin strokes"): a whole glyph (enough lit cells), drawn at full intensity (its brightest pixel as bright as
  real thin digits' are), with little ink (at most the ink of the thinnest quarter of real digits). All three
  thresholds are fitted on real digits only. Ink alone would reward drawing less: a real ordinary digit dimmed to
  80 % of its brightness has "little ink" but no full-intensity stroke, so it does not count.
- faint: the brightest pixel below that of nearly every real thin digit; blank: hardly any lit cells. These are the
  cheap ways to "use less ink", reported beside every style rate.
- class: a scikit-learn SVC trained on real digits brought to the 8x8 grid. It is refitted at load time from the
  stored training features (safetensors), which is deterministic and takes a fraction of a second: no pickles.
- features: the hidden layer of a small digit classifier trained on real digits (digit labels only, never the
  style), the feature space of the kernel inception distance (see `ganrm_diffusers.world.metrics`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.svm import SVC

from ganrm_diffusers.utils.errors import CheckpointError
from ganrm_diffusers.utils.images import to_pixels
from ganrm_diffusers.world.style import STROKE_GRID, digit_grid, ink, lit_cells, peak

JUDGE_CONFIG = "judge.json"
CLASS_DATA = "class_judge.safetensors"
FEATURE_NET = "digit_features.safetensors"


@dataclass(frozen=True)
class StyleRule:
    """A style defined on pixels (see the module docstring); every threshold comes from real digits."""

    name: str
    description: str
    max_ink: float  # mean ink on the 8x8 grid
    min_peak: float  # brightest pixel on the 16 px grid; below it an image is "faint"
    min_lit_cells: int  # lit cells of the 8x8 grid a whole thin glyph covers
    blank_lit_cells: int  # fewer lit cells than this: "blank"
    ink_scale: float  # spreads of the three measures among real digits, so style_measure reads in them
    peak_scale: float
    lit_scale: float


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
        gray = to_pixels(images).cpu().float().mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(gray, STROKE_GRID).flatten(1)

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

    def has_style(self, images: object) -> torch.Tensor:
        """A boolean per image: a whole glyph with full-intensity, thin strokes."""
        return self.style_measure(images) >= 0

    def style_measure(self, images: object) -> torch.Tensor:
        """How far into the style each image is, in real-digit spreads of its weakest criterion (>= 0 exactly when
        it has the style): the least of the ink margin, the peak-intensity margin and the glyph-size margin."""
        return rule_measure(self.style, images)

    def style_rate(self, images: object) -> float:
        """The fraction of images that show the style."""
        return float(self.has_style(images).float().mean())

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


def rule_measure(rule: StyleRule, images: object) -> torch.Tensor:
    """`Judges.style_measure` for a bare rule (the world build splits real digits with it before judges exist)."""
    margins = torch.stack(
        [
            (rule.max_ink - ink(images)) / rule.ink_scale,
            (peak(images) - rule.min_peak) / rule.peak_scale,
            (lit_cells(images).float() - rule.min_lit_cells) / rule.lit_scale,
        ]
    )
    return margins.amin(dim=0)


def fit_style_rule(images: object, quantile: float) -> StyleRule:
    """The "thin" rule from real digits: little ink (at most the `quantile` of real digits' ink), and the peak
    intensity and glyph size that 99 % of those real thin digits reach."""
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
