"""Choosing the best images of a batch by reward: the one selection rule that the pipeline and nodes share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ganrm_diffusers.utils.errors import GanrmError


class ScoreError(GanrmError, ValueError):
    """Scores that cannot be ranked (NaN, wrong shape, groups that do not divide the batch)."""


@dataclass
class Selection:
    """Batch indices of the chosen images (group-major, best first within each group) and of the rest."""

    selected: torch.Tensor
    scores: torch.Tensor
    rejected: torch.Tensor
    groups: torch.Tensor  # the group of each selected index

    def __len__(self) -> int:
        return len(self.selected)


def select_top_k(
    scores: torch.Tensor | Sequence[float],
    k: int,
    group_size: int | None = None,
    threshold: float | None = None,
) -> Selection:
    """The `k` best of each group of `group_size` consecutive scores (all scores form one group by default).

    Ties go to the earlier image (the lower candidate index, so the lower seed). With `threshold`, images scoring
    below it are never selected, so a group may yield fewer than `k`. NaN scores are an error: a NaN reward means
    a broken image or model, and silently ranking it first or last would hide that.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    if scores.ndim != 1 or len(scores) == 0:
        raise ScoreError(f"expected a non-empty 1-D tensor of scores, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        bad = torch.nonzero(torch.isnan(scores)).flatten().tolist()
        raise ScoreError(f"reward scores are NaN for image(s) {bad[:10]}: check the images and the reward model")
    group_size = group_size or len(scores)
    if len(scores) % group_size:
        raise ScoreError(f"a batch of {len(scores)} images cannot be split into groups of {group_size}")
    if not 1 <= k <= group_size:
        raise ScoreError(f"top_k must be between 1 and the group size {group_size}, got {k}")

    grouped = scores.view(-1, group_size)
    order = grouped.argsort(dim=1, descending=True, stable=True)[:, :k]
    offsets = torch.arange(grouped.shape[0]).unsqueeze(1) * group_size
    selected = (order + offsets).flatten()
    groups = torch.arange(grouped.shape[0]).repeat_interleave(k)
    if threshold is not None:
        keep = scores[selected] >= threshold
        selected, groups = selected[keep], groups[keep]
    rejected_mask = torch.ones(len(scores), dtype=torch.bool)
    rejected_mask[selected] = False
    return Selection(
        selected=selected,
        scores=scores[selected],
        rejected=torch.nonzero(rejected_mask).flatten(),
        groups=groups,
    )
