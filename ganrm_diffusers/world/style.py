"""The world's pixels: real digits at the world's resolution, and glyph measures taken on any image.

Every measure first brings an image to a fixed grid (grayscale, area-averaged): the 8x8 grid of scikit-learn's digits
for amounts of ink, the world's 16 px grid for stroke intensity. So it reads a 16 px generated digit, a PNG of a real
digit and a PIL image the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ganrm_diffusers.utils.images import to_pixels

DIGIT_GRID = 8  # scikit-learn's digits are 8x8, values 0..16
STROKE_GRID = 16  # the world's image size: stroke intensity is read here, before averaging blurs it
LIT_LEVEL = 0.3  # a cell of the 8x8 grid is part of the glyph when at least this bright
GLYPH_LEVEL = 0.25  # a pixel of the 16 px grid is part of the glyph's strokes when at least this bright
# Pixels dimmer than this are background, not ink: mild sensor-like noise on a black background adds no "ink".
INK_FLOOR = 0.1


@dataclass
class RealDigits:
    """scikit-learn's 1797 digits as the world shows them: RGB uint8 NCHW (grayscale replicated), white ink on black."""

    images: torch.Tensor
    digits: torch.Tensor

    def __len__(self) -> int:
        return len(self.digits)

    def pixels(self, indices: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Float NCHW in [0, 1], the form a diffusers pipeline returns with output_type="pt"."""
        images = self.images if indices is None else self.images[torch.as_tensor(indices)]
        return images.float() / 255.0


def load_real_digits(image_size: int) -> RealDigits:
    """The bundled digits upscaled (bilinear) to `image_size` and quantised to uint8, exactly as saved as PNG."""
    bunch = load_digits()
    grid = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    upscaled = F.interpolate(grid, size=image_size, mode="bilinear", align_corners=False).clamp(0, 1)
    images = (upscaled * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return RealDigits(images=images, digits=torch.tensor(bunch.target, dtype=torch.long))


def digit_grid(images: object) -> torch.Tensor:
    """N x 8 x 8 grayscale in [0, 1]: any accepted image form, area-averaged down to the digits' own grid."""
    pixels = to_pixels(images).cpu()
    gray = pixels.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(gray, DIGIT_GRID)[:, 0]


def ink(images: object) -> torch.Tensor:
    """Mean ink of each image on the 8x8 grid (0 = blank, 1 = all white): thin strokes use little ink, and so do
    faint or broken ones, which is why the style judge never reads ink alone."""
    return digit_grid(images).flatten(1).mean(dim=1)


def peak(images: object) -> torch.Tensor:
    """The brightest pixel of each image on the world's 16 px grid: a real stroke reaches full intensity at its
    core however thin it is, a dimmed or faint glyph does not."""
    return stroke_grid(images).flatten(1).amax(dim=1)


def lit_cells(images: object) -> torch.Tensor:
    """How many cells of the 8x8 grid the glyph covers (brighter than LIT_LEVEL): a whole digit covers many, a
    fragment or a blank image few."""
    return (digit_grid(images).flatten(1) > LIT_LEVEL).sum(dim=1)


def stroke_grid(images: object) -> torch.Tensor:
    """N x 16 x 16 grayscale in [0, 1] on the world's grid: where stroke intensity and continuity are read."""
    gray = to_pixels(images).cpu().float().mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(gray, STROKE_GRID)[:, 0]


def stroke_ink(images: object) -> torch.Tensor:
    """Mean ink on the 8x8 grid counting only stroke pixels (INK_FLOOR and brighter on the 16 px grid), so that
    faint background noise does not turn a thin digit into a heavy one."""
    grid = stroke_grid(images)
    strokes = grid * (grid >= INK_FLOOR)
    return F.adaptive_avg_pool2d(strokes[:, None], DIGIT_GRID).flatten(1).mean(dim=1)


def _glyph_quantile(grid: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each image's glyph pixels (GLYPH_LEVEL and brighter); 0 for an image with none."""
    values = []
    for image in grid:
        lit = image[image >= GLYPH_LEVEL]
        values.append(torch.quantile(lit, q) if len(lit) else image.new_zeros(()))
    return torch.stack(values)


def stroke_core(images: object) -> torch.Tensor:
    """The intensity nine tenths of a glyph's pixels stay below (its 90th percentile): the brightness of the stroke
    cores along the whole glyph. A few pixels or a small patch set to full intensity barely move it, so a dimmed
    glyph with a bright spot still reads as dimmed, unlike `peak`."""
    return _glyph_quantile(stroke_grid(images), 0.9)


def glyph_intensity(images: object) -> torch.Tensor:
    """The median intensity of each glyph's pixels (GLYPH_LEVEL and brighter): reported beside every style rate,
    so a method that draws dimmer glyphs shows it (real thin digits sit a little below ordinary ones)."""
    return _glyph_quantile(stroke_grid(images), 0.5)


def stroke_continuity(images: object) -> torch.Tensor:
    """The share of a glyph's closed shape its pixels fill: the glyph mask over its morphological closing (3x3).
    Whole strokes fill it (about 0.97 for real digits); strokes with dropped pixels or broken into dashes leave
    holes the closing fills. 0 for an image with no glyph."""
    mask = stroke_grid(images) >= GLYPH_LEVEL
    padded = F.pad(mask.float()[:, None], (2, 2, 2, 2))
    dilated = F.max_pool2d(padded, 3, stride=1, padding=1)
    closed = -F.max_pool2d(-dilated, 3, stride=1, padding=1)  # erosion of the dilation
    area = mask.flatten(1).sum(dim=1).float()
    return area / closed.flatten(1).sum(dim=1).clamp_min(1.0)


def glyph_height(images: object) -> torch.Tensor:
    """How many rows of the 16 px grid the glyph spans (first to last row with a glyph pixel): a shrunk glyph or
    one with its top or bottom erased is shorter than every real digit."""
    rows = (stroke_grid(images) >= GLYPH_LEVEL).any(dim=2)
    index = torch.arange(rows.shape[1])
    first = torch.where(rows, index, rows.shape[1]).amin(dim=1)
    last = torch.where(rows, index, -1).amax(dim=1)
    return (last - first + 1).clamp_min(0).float()


def glyph_box(images: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Height (in pixels) and horizontal centre (0 = left edge, 1 = right edge) of each glyph's lit rows and columns.
    Shape attributes that say nothing about how much ink a stroke carries."""
    gray = to_pixels(images).cpu().mean(dim=1)
    size = gray.shape[-1]
    lit = gray > 0.5
    rows, columns = lit.any(dim=2), lit.any(dim=1)
    positions = torch.arange(size, dtype=torch.float32)
    height = rows.sum(dim=1).float()
    count = columns.sum(dim=1).clamp_min(1)
    centre = (columns.float() * positions).sum(dim=1) / count / max(size - 1, 1)
    return height, centre


def slant(images: object) -> torch.Tensor:
    """Horizontal shift of the ink per row going up (positive = leaning right), from the ink's second moments."""
    gray = to_pixels(images).cpu().mean(dim=1)
    size = gray.shape[-1]
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    mass = gray.sum(dim=(1, 2)).clamp_min(1e-6)
    mean_x = (gray * xs).sum(dim=(1, 2)) / mass
    mean_y = (gray * ys).sum(dim=(1, 2)) / mass
    dx, dy = xs - mean_x[:, None, None], ys - mean_y[:, None, None]
    # Image rows grow downwards, so a right lean has x decreasing with y: the sign is flipped.
    return -(gray * dx * dy).sum(dim=(1, 2)) / (gray * dy * dy).sum(dim=(1, 2)).clamp_min(1e-6)
