"""Files written before the subpackage layout load unchanged: a reward checkpoint saved by the flat-module code (in
tests/fixtures/before_layout, written by its make_fixture.py at commit f7337ca of the old layout) gives the scores it
gave then, and saved pipelines' `["ganrm_diffusers", "GANRewardModel"]` entries still resolve."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "before_layout"


def test_a_reward_checkpoint_from_before_the_layout_scores_as_it_did():
    from ganrm_diffusers import GANRewardModel

    expected = json.loads((FIXTURE / "scores.json").read_text())
    model = GANRewardModel.from_pretrained(FIXTURE / "reward_model")
    images = torch.rand(*expected["shape"], generator=torch.Generator().manual_seed(expected["seed"]))
    scores = model.score(images).double()
    reference = torch.tensor(expected["scores"], dtype=torch.float64)
    # The same weights and arithmetic in float32: agreement far inside any change a wrong load would make.
    assert torch.linalg.vector_norm(scores - reference) <= 1e-4 * torch.linalg.vector_norm(reference)


def test_saved_pipelines_library_entry_still_resolves():
    # diffusers loads a pipeline component from model_index.json's [library, class] by importing the library and
    # taking the class from it.
    library = importlib.import_module("ganrm_diffusers")
    for name in ("GANRewardModel", "RewardGuidedPipeline", "RewardGuidedXLPipeline"):
        assert getattr(library, name).__name__ == name
