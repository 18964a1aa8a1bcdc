"""select_top_k: the one selection rule shared by the pipeline and the ComfyUI nodes."""

from __future__ import annotations

import pytest
import torch

from ganrm_diffusers.generation.selection import ScoreError, select_top_k


def test_top_k_per_group_is_group_major_best_first():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 3.0, -1.0, 2.0, 2.5])
    selection = select_top_k(scores, k=2, group_size=4)
    assert selection.selected.tolist() == [1, 3, 4, 7]
    assert selection.groups.tolist() == [0, 0, 1, 1]
    assert torch.equal(selection.scores, scores[[1, 3, 4, 7]])
    assert selection.rejected.tolist() == [0, 2, 5, 6]


def test_one_group_by_default_and_lists_accepted():
    selection = select_top_k([1.0, 5.0, 3.0], k=1)
    assert selection.selected.tolist() == [1] and selection.rejected.tolist() == [0, 2]


def test_ties_go_to_the_earlier_candidate():
    assert select_top_k(torch.tensor([1.0, 2.0, 2.0, 2.0]), k=2).selected.tolist() == [1, 2]


def test_threshold_can_leave_a_group_short_or_empty():
    scores = torch.tensor([0.2, 0.8, -0.5, -0.1])
    selection = select_top_k(scores, k=2, group_size=2, threshold=0.5)
    assert selection.selected.tolist() == [1]
    assert selection.groups.tolist() == [0]
    assert selection.rejected.tolist() == [0, 2, 3]


@pytest.mark.parametrize(
    ("scores", "kwargs", "message"),
    [
        (torch.tensor([0.1, float("nan"), 0.3]), {"k": 1}, r"NaN for image\(s\) \[1\]"),
        (torch.tensor([0.1, 0.2, 0.3]), {"k": 1, "group_size": 2}, "cannot be split into groups of 2"),
        (torch.tensor([0.1, 0.2]), {"k": 3}, "between 1 and the group size 2"),
        (torch.tensor([0.1, 0.2]), {"k": 0}, "between 1 and the group size 2"),
        (torch.zeros(0), {"k": 1}, "non-empty"),
        (torch.zeros(2, 2), {"k": 1}, "1-D"),
    ],
)
def test_bad_scores_are_clear_errors(scores, kwargs, message):
    with pytest.raises(ScoreError, match=message):
        select_top_k(scores, **kwargs)
