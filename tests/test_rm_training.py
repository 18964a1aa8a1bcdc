"""Training the GAN-RM head: it learns, it is reproducible, it caches, and bootstrapping does what the paper says."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from ganrm_diffusers.reward.embedding_cache import EmbeddingCache, embed_files
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import (
    RewardDataset,
    RewardTrainingConfig,
    bootstrap_round,
    brightness_gains,
    fit_reward_model,
    split_validation,
)
from ganrm_diffusers.utils.errors import ImageInputError
from ganrm_diffusers.utils.images import load_image, load_image_folder, to_pixels


def _fresh(tiny_backbone: str) -> GANRewardModel:
    return GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(64,), dropout=0.1)


def _heldout_auc(model: GANRewardModel, folders: dict) -> float:
    positives = model.score(load_image_folder(folders["heldout_positives"]).images)
    negatives = model.score(load_image_folder(folders["heldout_negatives"]).images)
    labels = [1] * len(positives) + [0] * len(negatives)
    return roc_auc_score(labels, torch.cat([positives, negatives]).numpy())


def test_reward_model_learns_a_visual_property(tiny_backbone, property_folders, tmp_path):
    model, report = fit_reward_model(
        property_folders["positives"],
        property_folders["negatives"],
        model=_fresh(tiny_backbone),
        cache=EmbeddingCache(tmp_path / "cache"),
    )
    assert report.metrics["val_auc"] >= 0.95
    assert _heldout_auc(model, property_folders) >= 0.95  # images the training never saw
    summary = model.config.training
    assert summary["positives"]["count"] == 80 and summary["negatives"]["count"] == 80
    assert summary["metrics"]["val_auc"] == report.metrics["val_auc"]


def test_training_is_seeded_and_reproducible(tiny_backbone, property_folders, tmp_path):
    runs = []
    for _ in range(2):
        model, report = fit_reward_model(
            property_folders["positives"],
            property_folders["negatives"],
            model=_fresh(tiny_backbone),
            cache=EmbeddingCache(tmp_path / "cache"),
            config=RewardTrainingConfig(seed=7, max_epochs=40),
        )
        runs.append((model.head.state_dict(), report.metrics))
    (first, first_metrics), (second, second_metrics) = runs
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert {k: v for k, v in first_metrics.items() if k != "train_seconds"} == {
        k: v for k, v in second_metrics.items() if k != "train_seconds"
    }


def test_embeddings_are_cached_by_content_and_backbone(tiny_backbone, property_folders, tmp_path, monkeypatch):
    model = _fresh(tiny_backbone)
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_files(model.encoder, property_folders["positives"], cache=cache)
    calls = []
    original = model.encoder.encode_images
    monkeypatch.setattr(model.encoder, "encode_images", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = embed_files(model.encoder, property_folders["positives"], cache=cache)
    assert calls == [] and torch.equal(first.embeddings, again.embeddings)
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 80 and all(model.encoder.fingerprint() in str(entry) for entry in entries)

    # A copy of a file under another name reuses its entry: the key is the content, not the path.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "copy.png").write_bytes(next(property_folders["positives"].glob("*.png")).read_bytes())
    embed_files(model.encoder, renamed, cache=cache)
    assert calls == []


def test_dataset_split_keeps_pseudo_labels_out_of_validation():
    dataset = RewardDataset.from_sides(torch.randn(20, 4), torch.randn(30, 4))
    dataset = dataset.extend(torch.randn(6, 4), torch.tensor([1.0, 0.9, 0.8, 0.0, 0.0, 0.0]))
    train, val = split_validation(dataset, 0.2, seed=0)
    assert dataset.hard[val].all() and len(val) == 10
    assert (dataset.labels[val] == 1).sum() == 4 and (dataset.labels[val] == 0).sum() == 6
    assert set(train.tolist()) | set(val.tolist()) == set(range(len(dataset)))


def test_bootstrap_round_adds_soft_top_m_and_hard_bottom_m(tiny_backbone):
    model = _fresh(tiny_backbone)
    torch.manual_seed(0)
    dataset = RewardDataset.from_sides(
        torch.nn.functional.normalize(torch.randn(30, 32), dim=-1),
        torch.nn.functional.normalize(torch.randn(30, 32), dim=-1),
    )
    split = split_validation(dataset, 0.2, seed=0)
    pool = torch.nn.functional.normalize(torch.randn(25, 32), dim=-1)
    config = RewardTrainingConfig(bootstrap_m=5, bootstrap_alpha=0.5, max_epochs=5)
    with torch.no_grad():
        ranking = model.score_embeddings(pool).argsort(descending=True)
    extended, result = bootstrap_round(model, dataset, pool, config, split)

    assert len(extended) == len(dataset) + 10
    added_features, added_labels = extended.features[len(dataset) :], extended.labels[len(dataset) :]
    assert torch.equal(added_features[:5], pool[ranking[:5]])
    assert torch.equal(added_features[5:], pool[ranking[-5:]])
    assert torch.allclose(added_labels[:5], torch.tensor([math.exp(-0.5 * rank) for rank in range(5)]))
    assert torch.equal(added_labels[5:], torch.zeros(5))
    assert not extended.hard[len(dataset) :].any()
    assert result.metrics["val_size"] == len(split[1])  # validation is the same fixed split

    with pytest.raises(ImageInputError, match="M=5 needs at least 10 pool images"):
        bootstrap_round(model, dataset, pool[:9], config, split)


def test_fit_with_bootstrap_rounds_and_callbacks(tiny_backbone, property_folders, tmp_path):
    pool_files = sorted(property_folders["pool"].glob("*.png"))
    steps = []
    model, report = fit_reward_model(
        property_folders["positives"],
        property_folders["negatives"],
        model=_fresh(tiny_backbone),
        cache=EmbeddingCache(tmp_path / "cache"),
        config=RewardTrainingConfig(bootstrap_rounds=2, bootstrap_m=8, max_epochs=30),
        pools=[pool_files[0::2], pool_files[1::2]],
        progress=lambda step, total: steps.append((step, total)),
    )
    assert [row["round"] for row in report.rounds] == [0, 1, 2]
    assert len(report.dataset) == 160 + 2 * 16
    assert {row["round"] for row in report.history} == {0, 1, 2}
    assert steps[-1][1] == 90 and all(step <= total for step, total in steps)
    assert model.config.training["rounds"] == 2
    assert _heldout_auc(model, property_folders) >= 0.95

    stopped_after = []
    fit_reward_model(
        property_folders["positives"],
        property_folders["negatives"],
        model=_fresh(tiny_backbone),
        cache=EmbeddingCache(tmp_path / "cache"),
        config=RewardTrainingConfig(max_epochs=50),
        progress=lambda step, total: stopped_after.append(step),
        should_stop=lambda: len(stopped_after) >= 3,
    )
    assert stopped_after == [1, 2, 3]


def test_in_memory_sides_and_too_few_images(tiny_backbone, property_folders, tmp_path):
    from conftest import make_property_images

    model, report = fit_reward_model(
        make_property_images(24, True, seed=11),
        torch.stack([torch.rand(3, 40, 40) for _ in range(24)]),
        model=_fresh(tiny_backbone),
        config=RewardTrainingConfig(max_epochs=20, min_images_per_class=8),
    )
    assert report.metrics["train_size"] + report.metrics["val_size"] == 48
    with pytest.raises(ImageInputError, match="negatives batch has 3 image"):
        fit_reward_model(make_property_images(24, True, seed=11), torch.rand(3, 3, 40, 40), model=_fresh(tiny_backbone))
    small = tmp_path / "small"
    small.mkdir()
    for path in sorted(property_folders["positives"].glob("*.png"))[:3]:
        (small / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ImageInputError, match=r"small has 3 readable image\(s\); at least 8"):
        fit_reward_model(
            small, property_folders["negatives"], model=_fresh(tiny_backbone), cache=EmbeddingCache(tmp_path)
        )


def test_brightness_views_are_of_training_images_only(tiny_backbone, property_folders, tmp_path):
    """Each copy adds one view per training image (its label and its gain-scaled pixels); validation images get
    none, so the held-out split still holds images the head never saw in any form."""
    cache = EmbeddingCache(tmp_path / "cache")
    config = RewardTrainingConfig(max_epochs=3, augment_copies=2, brightness_jitter=0.4)
    plain = fit_reward_model(
        property_folders["positives"],
        property_folders["negatives"],
        model=_fresh(tiny_backbone),
        cache=cache,
        config=RewardTrainingConfig(max_epochs=3),
    )[1]
    model, report = fit_reward_model(
        property_folders["positives"],
        property_folders["negatives"],
        model=_fresh(tiny_backbone),
        cache=cache,
        config=config,
    )
    train, val = plain.split
    assert torch.equal(report.split[1], val)
    assert len(report.dataset) == 160 + 2 * len(train)
    added = slice(160, None)
    assert not report.dataset.hard[added].any()
    assert torch.equal(report.dataset.labels[added], plain.dataset.labels[train].repeat(2))
    assert set(report.split[0].tolist()) == set(train.tolist()) | set(range(160, len(report.dataset)))

    # The first view is the first training image scaled by the first gain of the seeded draw.
    gain = brightness_gains(len(train), 0.4, torch.Generator().manual_seed(config.seed + 7919))[0]
    files = sorted(property_folders["positives"].glob("*.png")) + sorted(property_folders["negatives"].glob("*.png"))
    expected = model.encoder.encode_images((to_pixels(load_image(files[int(train[0])])) * gain).clamp(0, 1))[0]
    view = report.dataset.features[160]
    assert torch.linalg.vector_norm(view - expected) <= 1e-4 * torch.linalg.vector_norm(expected)

    with pytest.raises(ValueError, match="brightness_jitter must be in"):
        brightness_gains(4, 1.5, torch.Generator())
