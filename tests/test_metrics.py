"""Set-level figures of the demo report: KID, diversity and bootstrap intervals, against direct float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganrm_diffusers.world.metrics import diversity, expected_verdicts, interval, kid, paired_ratio, paired_share


def _kid_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_its_definition_and_orders_distances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(20, 5))
    value, (low, high) = kid(torch.from_numpy(x), torch.from_numpy(y))
    # Both sides in float64: agreement to a relative 1e-9 of the kernel's scale is what float64 promises.
    assert value == pytest.approx(_kid_by_definition(x, y), abs=1e-9 * 8)
    assert low <= value <= high
    far, _ = kid(torch.from_numpy(x + 2.0), torch.from_numpy(y))
    assert far > high  # a shifted distribution is farther than the same one's interval reaches


def test_diversity_is_zero_for_one_glyph_per_digit_and_grows_with_spread():
    rng = np.random.default_rng(1)
    digits = np.repeat(np.arange(3), 10)
    same = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).repeat_interleave(10, dim=0)
    assert diversity(same, digits)[0] == pytest.approx(0.0, abs=1e-12)
    spread = torch.from_numpy(rng.uniform(size=(30, 3, 16, 16))).float()
    value, (low, high) = diversity(spread, digits)
    assert value > 0.5 and low <= value <= high


def test_intervals_cover_the_mean_and_shrink_with_samples():
    rng = np.random.default_rng(2)
    small, large = rng.random(50) < 0.3, rng.random(5000) < 0.3
    low, high = interval(small)
    assert low <= small.mean() <= high
    large_low, large_high = interval(large)
    assert (large_high - large_low) < (high - low) / 4
    assert large_low < 0.3 < large_high


def test_paired_ratio_resamples_pairs_together():
    rng = np.random.default_rng(3)
    baseline = (rng.random(400) < 0.1).astype(float)
    doubled = np.maximum(baseline, rng.random(400) < 0.1).astype(float)
    ratio, (low, high) = paired_ratio(doubled, baseline)
    assert ratio == pytest.approx(doubled.mean() / baseline.mean())
    assert 1.0 <= low <= ratio <= high
    assert paired_ratio(baseline, baseline) == (1.0, [1.0, 1.0])  # identical pairs: no spread at all


def test_paired_share_is_the_kept_share_of_the_gain_with_a_paired_interval():
    rng = np.random.default_rng(4)
    baseline = rng.random(300) * 0.2  # per-prompt expected rates of a random pick
    full = np.clip(baseline + rng.random(300) * 0.5, 0, 1)
    half = baseline + 0.5 * (full - baseline)
    share, (low, high) = paired_share(half, full, baseline)
    assert share == pytest.approx(0.5, rel=1e-12)
    assert low == pytest.approx(0.5, rel=1e-9) and high == pytest.approx(0.5, rel=1e-9)  # exact in every resample
    noisy = baseline + (full - baseline) * (rng.random(300) < 0.8)  # keeps the whole gain on about 80 % of prompts
    share, (low, high) = paired_share(noisy, full, baseline)
    assert share == pytest.approx((noisy - baseline).mean() / (full - baseline).mean())
    assert low < share < high and 0.6 < low and high < 1.0
    # No gain at all: the share and its interval are undefined, not a number that could pass a bar.
    share, bounds = paired_share(baseline, baseline, baseline)
    assert np.isnan(share) and all(np.isnan(bounds))


class _CountingJudges:
    """Judges whose verdicts are read off the image: style = mean > 0.5, faint = mean < 0.1, never blank,
    correct when the first pixel encodes the digit."""

    def has_style(self, images, digits, correct=None):
        return images.mean(dim=(1, 2, 3)) > 0.5

    def glyph_intensity(self, images):
        return images.amax(dim=(1, 2, 3))

    def is_faint(self, images):
        return images.mean(dim=(1, 2, 3)) < 0.1

    def is_blank(self, images):
        return torch.zeros(len(images), dtype=torch.bool)

    def is_correct(self, images, digits):
        return (images[:, 0, 0, 0] * 10).round().numpy().astype(int) == np.asarray(digits)


def test_expected_verdicts_average_each_prompts_candidates():
    digits = np.array([3, 7])
    candidates = torch.zeros(2 * 4, 1, 2, 2)
    candidates[[0, 1, 2], :, 1, :] = 1.0  # a row of ink on three of prompt 0's candidates
    candidates[:, 0, 0, 0] = torch.tensor([0.3, 0.3, 0.0, 0.3, 0.7, 0.7, 0.7, 0.0])
    verdicts = expected_verdicts(_CountingJudges(), candidates, digits)
    styled = (candidates.mean(dim=(1, 2, 3)) > 0.5).double().view(2, 4).mean(dim=1).numpy()
    assert verdicts["style"].tolist() == styled.tolist()
    assert verdicts["correct"].tolist() == [0.75, 0.75]
    assert verdicts["blank"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="not N per prompt"):
        expected_verdicts(_CountingJudges(), candidates[:7], digits)
