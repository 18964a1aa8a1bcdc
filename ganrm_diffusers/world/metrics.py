"""Set-level figures of a sample of world images, with 95 % bootstrap intervals.

`evaluate(judges, images, digits, reference)` gives one report row: the per-image judges as rates (style, faint,
blank, class) and the mean glyph intensity, the kernel inception distance to the held-out target digits (in the judges' digit-feature space, and
in pixel space beside it), and the diversity within each digit, each with a percentile bootstrap interval over the
sample. A method that gets its style by drawing faint or blank digits, by losing the digit, or by collapsing to one
glyph per digit shows it in these columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ganrm_diffusers.world.style import digit_grid

BOOTSTRAP_RATES = 2000
BOOTSTRAP_SETS = 200  # KID and diversity cost a matrix per resample


@dataclass
class Reference:
    """What a sample is compared with: the held-out target digits' features and 8x8 pixels."""

    features: torch.Tensor
    pixels: torch.Tensor

    @classmethod
    def of(cls, judges: object, images: object) -> Reference:
        return cls(features=judges.features(images).double(), pixels=digit_grid(images).flatten(1).double())


def interval(values: np.ndarray, *, resamples: int = BOOTSTRAP_RATES, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of the mean of `values` (one value per sample)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_ratio(values: np.ndarray, baseline: np.ndarray, *, seed: int = 0) -> tuple[float, list[float]]:
    """mean(values) / mean(baseline) and its 95 % bootstrap interval, resampling the pairs (same prompt and seeds)
    together."""
    values, baseline = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(BOOTSTRAP_RATES, len(values)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = values[picks].mean(axis=1) / baseline[picks].mean(axis=1)
        # No style in the baseline: "inf" when the row has some, undefined (nan, which meets no goal) when neither has.
        ratio = float(values.mean() / baseline.mean()) if baseline.mean() else float("inf" if values.mean() else "nan")
    return ratio, _finite_interval(ratios)


def paired_share(
    values: np.ndarray, full: np.ndarray, baseline: np.ndarray, *, seed: int = 0
) -> tuple[float, list[float]]:
    """The share of `full`'s gain over `baseline` that `values` keeps, mean(values - baseline) / mean(full -
    baseline) (one value per prompt in each, same prompts and seeds), and its 95 % bootstrap interval, resampling
    the prompts together."""
    values, full, baseline = (np.asarray(array, np.float64) for array in (values, full, baseline))
    kept, gain = values - baseline, full - baseline
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(BOOTSTRAP_RATES, len(values)))
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = kept[picks].mean(axis=1) / gain[picks].mean(axis=1)
    share = float(kept.mean() / gain.mean()) if gain.mean() else float("nan")
    return share, _finite_interval(shares)


def _finite_interval(estimates: np.ndarray) -> list[float]:
    """The 2.5 and 97.5 percentiles of bootstrap estimates; undefined (nan) when more than 5 % of the resamples
    had no estimate (a zero denominator)."""
    finite = estimates[np.isfinite(estimates)]
    if len(finite) < len(estimates) * 0.95:
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _polynomial_kernel(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return (first @ second.T / first.shape[1] + 1.0) ** 3


def kid(samples: torch.Tensor, reference: torch.Tensor, *, seed: int = 0) -> tuple[float, list[float]]:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel) between two feature sets, and its 95 %
    bootstrap interval over the samples (the reference fixed)."""
    samples, reference = samples.double(), reference.double()
    k_ss = _polynomial_kernel(samples, samples)
    k_sr = _polynomial_kernel(samples, reference).mean(dim=1)
    k_rr = _polynomial_kernel(reference, reference)
    n_ref = len(reference)
    ref_term = float((k_rr.sum() - k_rr.diagonal().sum()) / (n_ref * (n_ref - 1)))

    def estimate(index: torch.Tensor) -> float:
        block = k_ss[index][:, index]
        same = index[:, None] == index[None, :]  # the kernel of a sample with itself is not a pair
        pairs = (~same).sum()
        return float(block[~same].sum() / pairs + ref_term - 2 * k_sr[index].mean())

    value = estimate(torch.arange(len(samples)))
    rng = np.random.default_rng(seed)
    draws = [estimate(torch.from_numpy(rng.integers(0, len(samples), len(samples)))) for _ in range(BOOTSTRAP_SETS)]
    return value, [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def diversity(images: object, digits: np.ndarray, *, seed: int = 0) -> tuple[float, list[float]]:
    """Mean pairwise distance between the 8x8 glyphs drawn for the same digit, averaged over digits, with a 95 %
    bootstrap interval (resampling within each digit). One glyph per digit scores 0."""
    grid = digit_grid(images).flatten(1).double()
    digits = np.asarray(digits)
    groups = [torch.cdist(grid[digits == d], grid[digits == d]) for d in np.unique(digits) if (digits == d).sum() > 1]

    def estimate(picks: list[torch.Tensor]) -> float:
        means = []
        for distances, index in zip(groups, picks, strict=True):
            different = index[:, None] != index[None, :]
            means.append(float(distances[index][:, index][different].mean()) if different.any() else 0.0)
        return float(np.mean(means))

    value = estimate([torch.arange(len(g)) for g in groups])
    rng = np.random.default_rng(seed)
    draws = [
        estimate([torch.from_numpy(rng.integers(0, len(g), len(g))) for g in groups]) for _ in range(BOOTSTRAP_SETS)
    ]
    return value, [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def per_image(judges: object, images: object, digits: np.ndarray) -> dict[str, np.ndarray]:
    """The judges' verdict on each image, as 0/1 arrays (the inputs of every rate and paired comparison), and its
    glyph intensity (the median brightness of its glyph's pixels)."""
    correct = judges.is_correct(images, digits)
    return {
        "style": judges.has_style(images, digits, correct).numpy().astype(np.float64),
        "faint": judges.is_faint(images).numpy().astype(np.float64),
        "blank": judges.is_blank(images).numpy().astype(np.float64),
        "correct": correct.astype(np.float64),
        "glyph_intensity": judges.glyph_intensity(images).numpy().astype(np.float64),
    }


def expected_verdicts(judges: object, candidates: object, digits: np.ndarray) -> dict[str, np.ndarray]:
    """What a uniformly random pick among each prompt's candidates gets, in expectation: the judges' verdicts on
    `candidates` (the prompts' N candidates, prompt-major) averaged per prompt. The same mean as judging one random
    candidate per prompt, without the luck of the draw (which dominates when the style is rare)."""
    per_prompt = len(candidates) // len(digits)
    if per_prompt * len(digits) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates for {len(digits)} prompts: not N per prompt")
    verdicts = per_image(judges, candidates, np.repeat(np.asarray(digits), per_prompt))
    return {key: value.reshape(len(digits), per_prompt).mean(axis=1) for key, value in verdicts.items()}


def evaluate(
    judges: object,
    images: torch.Tensor,
    digits: np.ndarray,
    reference: Reference,
    verdicts: dict[str, np.ndarray] | None = None,
) -> dict:
    """One report row for `images` (NCHW in [0, 1]) meant to show `digits`. The rates come from `verdicts` where
    given (one value per prompt, e.g. `expected_verdicts`), else from the judges on `images`; KID and diversity
    always from `images`."""
    verdicts = per_image(judges, images, digits) if verdicts is None else verdicts
    row: dict = {"count": len(images)}
    for name, key in (("style_rate", "style"), ("faint_rate", "faint"), ("blank_rate", "blank")):
        row[name] = float(verdicts[key].mean())
        row[f"{name}_ci95"] = interval(verdicts[key])
    row["class_accuracy"] = float(verdicts["correct"].mean())
    row["class_accuracy_ci95"] = interval(verdicts["correct"])
    # A method that buys its style by dimming shows it here before it shows as "faint".
    row["glyph_intensity"] = float(verdicts["glyph_intensity"].mean())
    row["glyph_intensity_ci95"] = interval(verdicts["glyph_intensity"])
    row["kid_to_target"], row["kid_to_target_ci95"] = kid(judges.features(images), reference.features)
    row["kid_pixels_to_target"], row["kid_pixels_to_target_ci95"] = kid(digit_grid(images).flatten(1), reference.pixels)
    row["diversity"], row["diversity_ci95"] = diversity(images, digits)
    return row
