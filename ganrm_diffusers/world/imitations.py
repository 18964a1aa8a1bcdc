"""Cheap imitations of the thin style, made from real digits: what a generator could learn instead of thin strokes.

Each imitation is a deterministic function of real ordinary digits (dimmed, with a bright pixel or patch, with
dropped pixels, blurred, partly erased, shrunk); `judge_audit` gives the share of each that the style judge counts
as "thin", beside the share of held-out real thin digits it keeps (as they are, shifted by a pixel, under mild
noise). The world build writes the audit into world.json (`imitations`), the demo report shows it, and the tests hold
the judge to it. Images are NCHW floats in [0, 1] on the world's 16 px grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Imitation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# The bar the issue sets: at most this share of any cheap imitation counts as the style...
IMITATION_BAR = 0.05
# ...and at least this share of held-out real thin digits does, also shifted or under mild noise.
THIN_BAR = 0.90


def dimmed(factor: float) -> Imitation:
    return lambda images, _: images * factor


def dimmed_with_bright_spot(factor: float, size: int) -> Imitation:
    """Dimmed, then a size x size patch at the brightest pixel set to full intensity (size 1: one pixel)."""

    def make(images: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        out = images * factor
        gray = out.mean(dim=1)
        width = gray.shape[-1]
        for index, flat in enumerate(gray.flatten(1).argmax(dim=1).tolist()):
            row, column = min(flat // width, width - size), min(flat % width, width - size)
            out[index, :, row : row + size, column : column + size] = 1.0
        return out

    return make


def dropped_pixels(share: float) -> Imitation:
    return lambda images, generator: images * (torch.rand(images[:, :1].shape, generator=generator) >= share)


def blurred(kernel: int) -> Imitation:
    return lambda images, _: F.avg_pool2d(images, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def erased(side: str) -> Imitation:
    """The glyph's left / right half or top / bottom third set to black."""

    def make(images: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        out, size = images.clone(), images.shape[-1]
        half, third = size // 2, size * 3 // 8
        region = {
            "left": (slice(None), slice(0, half)),
            "right": (slice(None), slice(half, None)),
            "top": (slice(0, third), slice(None)),
            "bottom": (slice(size - third, None), slice(None)),
        }[side]
        out[:, :, region[0], region[1]] = 0.0
        return out

    return make


def shrunk(size: int) -> Imitation:
    """The glyph drawn smaller (bilinear) in the middle of the grid: less ink, strokes thinner only by scale."""

    def make(images: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        full = images.shape[-1]
        small = F.interpolate(images, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        out = torch.zeros_like(images)
        offset = (full - size) // 2
        out[:, :, offset : offset + size, offset : offset + size] = small
        return out

    return make


def shifted(pixels: int, dim: int) -> Imitation:
    return lambda images, _: torch.roll(images, pixels, dims=dim)


def noisy(std: float) -> Imitation:
    return lambda images, generator: (images + std * torch.randn(images[:, :1].shape, generator=generator)).clamp(0, 1)


IMITATIONS: dict[str, Imitation] = {
    **{f"dimmed_{f}": dimmed(f) for f in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)},
    **{f"dimmed_{f}_bright_pixel": dimmed_with_bright_spot(f, 1) for f in (0.6, 0.7, 0.8, 0.9)},
    **{f"dimmed_{f}_bright_2x2": dimmed_with_bright_spot(f, 2) for f in (0.6, 0.7, 0.75, 0.8, 0.9)},
    "dropped_30pct": dropped_pixels(0.3),
    "dropped_15pct": dropped_pixels(0.15),
    "blurred_3x3": blurred(3),
    **{f"erased_{side}": erased(side) for side in ("left", "right", "top", "bottom")},
    **{f"shrunk_{size}px": shrunk(size) for size in (11, 13, 14)},
}
THIN_VARIANTS: dict[str, Imitation] = {
    "as_is": lambda images, _: images,
    "shifted_right": shifted(1, 3),
    "shifted_down": shifted(1, 2),
    "noise_0.03": noisy(0.03),
}


def judge_audit(
    judges: object,
    ordinary: torch.Tensor,
    ordinary_digits: object,
    thin: torch.Tensor,
    thin_digits: object,
    *,
    seed: int = 0,
) -> dict:
    """The share of each imitation of `ordinary` real digits that `judges` counts as the style, and of each variant
    of real `thin` digits (held out from every fit); every figure is measured on these images, with the bars."""
    generator = torch.Generator().manual_seed(seed)
    imitations = {
        name: round(judges.style_rate(make(ordinary, generator), ordinary_digits), 4)
        for name, make in IMITATIONS.items()
    }
    thin_rates = {
        name: round(judges.style_rate(make(thin, generator), thin_digits), 4) for name, make in THIN_VARIANTS.items()
    }
    return {
        "imitations_counted_as_style": imitations,
        "heldout_thin_counted_as_style": thin_rates,
        "imitation_bar": IMITATION_BAR,
        "thin_bar": THIN_BAR,
        "imitations_over_bar": sorted(name for name, rate in imitations.items() if rate > IMITATION_BAR),
        "thin_under_bar": sorted(name for name, rate in thin_rates.items() if rate < THIN_BAR),
        "ordinary_count": len(ordinary),
        "thin_count": len(thin),
        "median_glyph_intensity": {
            "heldout_thin": float(np.median(judges.glyph_intensity(thin).numpy())),
            "heldout_ordinary": float(np.median(judges.glyph_intensity(ordinary).numpy())),
        },
    }
