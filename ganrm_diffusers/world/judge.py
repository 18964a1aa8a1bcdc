"""The world's independent judges: they read pixels directly and share nothing with any reward model.

- style: "thin strokes" = at most the ink of the thinnest quarter of real digits (see `style.ink`).
- class: a scikit-learn SVC trained on real digits brought to the 8x8 grid. It is refitted at load time from the
  stored training features (safetensors), which is deterministic and takes a fraction of a second: no pickles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.svm import SVC

from ganrm_diffusers.errors import CheckpointError
from ganrm_diffusers.world.style import digit_grid, ink

JUDGE_CONFIG = "judge.json"
CLASS_DATA = "class_judge.safetensors"


@dataclass(frozen=True)
class StyleRule:
    """A style defined on pixels: an image has it when its ink is at most `threshold`."""

    name: str
    description: str
    threshold: float
    scale: float  # the ink spread of real digits, so style_measure reads in standard deviations


class Judges:
    """`style_rate`, `style_measure` and `class_accuracy` on any image form ganrm accepts (see ganrm_diffusers.images)."""

    def __init__(self, style: StyleRule, class_features: torch.Tensor, class_digits: torch.Tensor, svc_c: float = 10.0):
        self.style = style
        self.class_features = class_features.float()
        self.class_digits = class_digits.long()
        self.svc_c = svc_c
        self._classifier = SVC(C=svc_c, gamma="scale").fit(_svc_input(self.class_features), self.class_digits.numpy())

    @classmethod
    def fit(cls, style: StyleRule, images: object, digits: torch.Tensor, svc_c: float = 10.0) -> Judges:
        """Judges whose class judge learns from `images` (real digits) labelled `digits`."""
        return cls(style, digit_grid(images).flatten(1), torch.as_tensor(digits), svc_c)

    # ----------------------------------------------------------------------------------------------------------
    # Style

    def has_style(self, images: object) -> torch.Tensor:
        """A boolean per image: does it show the style?"""
        return ink(images) <= self.style.threshold

    def style_rate(self, images: object) -> float:
        """The fraction of images that show the style."""
        return float(self.has_style(images).float().mean())

    def style_measure(self, images: object) -> torch.Tensor:
        """How far into the style each image is, in real-digit standard deviations (>= 0 exactly when it has it)."""
        return (self.style.threshold - ink(images)) / self.style.scale

    # ----------------------------------------------------------------------------------------------------------
    # Class

    def predict_digits(self, images: object) -> np.ndarray:
        """The digit the class judge reads in each image."""
        return self._classifier.predict(_svc_input(digit_grid(images).flatten(1)))

    def class_accuracy(self, images: object, digits: object) -> float:
        """The fraction of images read as the digit they were meant to show (`digits`: one int per image)."""
        expected = np.asarray(digits, dtype=np.int64).reshape(-1)
        predicted = self.predict_digits(images)
        if len(expected) != len(predicted):
            raise ValueError(f"class_accuracy got {len(predicted)} images but {len(expected)} digits")
        return float((predicted == expected).mean())

    # ----------------------------------------------------------------------------------------------------------
    # Files

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"features": self.class_features.contiguous(), "digits": self.class_digits.contiguous()},
            folder / CLASS_DATA,
        )
        config = {
            "style": asdict(self.style),
            "class_judge": {"kind": "sklearn.svm.SVC", "C": self.svc_c, "gamma": "scale"},
        }
        (folder / JUDGE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Judges:
        folder = Path(folder)
        try:
            config = json.loads((folder / JUDGE_CONFIG).read_text())
            data = load_file(folder / CLASS_DATA)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read the world's judges in {folder}: {error}") from error
        return cls(StyleRule(**config["style"]), data["features"], data["digits"], config["class_judge"]["C"])


def _svc_input(grid_features: torch.Tensor) -> np.ndarray:
    # scikit-learn's digits count ink from 0 to 16; the SVC's default gamma is tuned on that scale.
    return grid_features.numpy().astype(np.float64) * 16.0
