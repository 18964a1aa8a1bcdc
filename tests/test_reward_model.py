"""GANRewardModel: scoring from every input form, checkpoints, backbone checks, the Hub."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import assert_relative_close
from conftest import TINY_CLIP_CONFIG, write_tiny_clip
from huggingface_hub import CommitOperationAdd, HfApi

from ganrm_diffusers.reward.backbone import ClipBackbone
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.utils.errors import CheckpointError, ImageInputError
from ganrm_diffusers.utils.images import to_pil

# The same images scored through another input path or batch composition: equal up to float32 order (and the last
# bit of a [-1, 1] round trip), compared as a vector; a wrong conversion (channel order, value range, resize)
# moves the scores by 1e-2 or more.
SCORE_RTOL = 1e-4


@pytest.fixture
def model(tiny_reward_model):
    torch.manual_seed(3)
    for parameter in tiny_reward_model.head.parameters():  # a head that is not all-zero-ish
        parameter.data.normal_(0, 0.5)
    return tiny_reward_model


def test_same_scores_whatever_the_input_form(model):
    uint8 = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    unit = uint8.float() / 255
    reference = model.score(unit)
    forms = {
        "PIL": to_pil(unit),
        "uint8 NCHW": uint8,
        "uint8 NHWC": uint8.permute(0, 2, 3, 1),
        "float NHWC (ComfyUI)": unit.permute(0, 2, 3, 1).contiguous(),
        "float in [-1, 1]": (unit * 2 - 1, {"value_range": (-1.0, 1.0)}),
        "numpy NHWC": uint8.permute(0, 2, 3, 1).numpy(),
        "list of CHW tensors": list(unit),
        "batch size 1": (unit, {"batch_size": 1}),
    }
    for name, form in forms.items():
        images, kwargs = form if isinstance(form, tuple) else (form, {})
        assert_relative_close(model.score(images, **kwargs), reference, SCORE_RTOL, name)
    assert reference.dtype == torch.float32 and reference.shape == (4,)
    assert torch.allclose(model.probability(unit), torch.sigmoid(reference))


def test_images_of_different_sizes_are_scored_one_by_one(model):
    images = [torch.rand(3, 32, 32), torch.rand(3, 64, 40), torch.rand(3, 20, 90)]
    batch_scores = model.score(images)
    single = torch.cat([model.score(image) for image in images])
    assert_relative_close(batch_scores, single, SCORE_RTOL, "a list of sizes vs one by one")


def test_preprocessing_matches_open_clip_transform_on_pil(model):
    """Our on-device resize/crop/normalise gives the embeddings open_clip's own PIL transform gives."""
    import open_clip

    images = to_pil(torch.rand(3, 3, 64, 96))
    transform = open_clip.image_transform(
        model.encoder.image_size,
        is_train=False,
        mean=model.encoder.mean.flatten().tolist(),
        std=model.encoder.std.flatten().tolist(),
    )
    with torch.no_grad():
        theirs = model.encoder.clip.encode_image(torch.stack([transform(image) for image in images]))
    ours = model.encoder.encode_images(images)
    cosine = torch.nn.functional.cosine_similarity(ours, torch.nn.functional.normalize(theirs, dim=-1))
    assert cosine.min() > 0.999  # PIL resamples in uint8, we in float: close, not bit-equal


def test_save_and_load_give_identical_scores(model, tmp_path):
    images = torch.rand(5, 3, 32, 32)
    model.save_pretrained(tmp_path / "rm")
    files = sorted(os.listdir(tmp_path / "rm"))
    assert files == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["backbone_in_checkpoint"] is True  # a local-dir backbone travels with the head
    assert config["embed_dim"] == 32 and config["hidden_sizes"] == [32]
    loaded = GANRewardModel.from_pretrained(tmp_path / "rm")
    assert torch.equal(loaded.score(images), model.score(images))


def test_checkpoint_without_backbone_reloads_it_by_name(model, tmp_path, tiny_backbone):
    model.save_pretrained(tmp_path / "rm", save_backbone=False)
    from safetensors.torch import load_file

    assert all(key.startswith("head.") for key in load_file(tmp_path / "rm" / "model.safetensors"))
    loaded = GANRewardModel.from_pretrained(tmp_path / "rm")
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.score(images), model.score(images))


def test_prompt_aware_variant(tiny_backbone, tmp_path):
    model = GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(16,), prompt_aware=True)
    torch.manual_seed(0)
    for parameter in model.head.parameters():
        parameter.data.normal_(0, 0.5)
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ImageInputError, match="prompt-aware"):
        model.score(images)
    with pytest.raises(ImageInputError, match="2 prompts for 3 images"):
        model.score(torch.rand(3, 3, 32, 32), ["a", "b"])
    cat, dog = model.score(images, "a cat"), model.score(images, "a dog")
    assert not torch.allclose(cat, dog)
    mixed = model.score(images, ["a cat", "a dog"])  # each image with its own prompt: another batch
    assert_relative_close(mixed, torch.stack([cat[0], dog[1]]), SCORE_RTOL, "a prompt per image")
    model.save_pretrained(tmp_path / "rm")
    assert torch.equal(GANRewardModel.from_pretrained(tmp_path / "rm").score(images, "a cat"), cat)


def test_checkpoint_for_another_backbone_is_refused_naming_both(model, tmp_path):
    model.save_pretrained(tmp_path / "rm")
    wide = dict(TINY_CLIP_CONFIG, embed_dim=48)
    other = ClipBackbone.load(f"local-dir:{write_tiny_clip(tmp_path / 'wide_clip', config=wide)}", None)
    with pytest.raises(CheckpointError, match=r"trained on backbone local-dir:.*embed dim 32.*wide_clip.*embed dim 48"):
        GANRewardModel.from_pretrained(tmp_path / "rm", backbone=other)
    with pytest.raises(CheckpointError, match=r"trained on backbone local-dir:.*not on 'ViT-B-32'"):
        GANRewardModel.from_pretrained(tmp_path / "rm", backbone="ViT-B-32")
    # A config edited to claim another embedding size no longer matches its backbone.
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    config["embed_dim"] = 64
    (tmp_path / "rm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="embed dim 64"):
        GANRewardModel.from_pretrained(tmp_path / "rm")


def test_broken_checkpoints_are_clear_errors(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        GANRewardModel.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path / "rm")

    broken = shutil.copytree(tmp_path / "rm", tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        GANRewardModel.from_pretrained(broken)

    no_config = shutil.copytree(tmp_path / "rm", tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        GANRewardModel.from_pretrained(no_config)

    other_class = shutil.copytree(tmp_path / "rm", tmp_path / "unet")
    (other_class / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel checkpoint, not a GANRewardModel"):
        GANRewardModel.from_pretrained(other_class)

    nan = shutil.copytree(tmp_path / "rm", tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    weights = load_file(nan / "model.safetensors")
    weights["head.net.0.weight"][0, 0] = float("nan")
    save_file(weights, nan / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        GANRewardModel.from_pretrained(nan)

    shapes = shutil.copytree(tmp_path / "rm", tmp_path / "shapes")
    config = json.loads((shapes / "config.json").read_text())
    config["hidden_sizes"] = [7]
    (shapes / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="head weights .* do not fit"):
        GANRewardModel.from_pretrained(shapes)


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay out a checkpoint the way huggingface_hub's cache stores a downloaded snapshot."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_ids_load_from_the_cache_offline(model, tmp_path):
    model.save_pretrained(tmp_path / "rm")
    _fake_hub_cache(tmp_path / "hub", "someone/ganrm-style", tmp_path / "rm")
    loaded = GANRewardModel.from_pretrained("someone/ganrm-style", cache_dir=str(tmp_path / "hub"))
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.score(images), model.score(images))
    with pytest.raises(CheckpointError, match="neither a local folder nor in the Hugging Face cache"):
        GANRewardModel.from_pretrained("someone/not-downloaded", cache_dir=str(tmp_path / "hub"))


def test_push_to_hub_uploads_exactly_what_save_pretrained_writes(model, tmp_path, monkeypatch):
    model.register_to_config(training={"description": "red squares", "metrics": {"val_auc": 0.97}})
    model.save_pretrained(tmp_path / "saved")
    expected = {name: (tmp_path / "saved" / name).read_bytes() for name in os.listdir(tmp_path / "saved")}
    uploaded: dict[str, bytes] = {}

    class Repo:
        repo_id = "someone/ganrm-red"

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd)
            uploaded[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        return "https://huggingface.co/someone/ganrm-red/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *args, **kwargs: None)  # a network call too
    # Without hf_xet, upload_folder sends everything through one create_commit, which we intercept.
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
    model.push_to_hub("someone/ganrm-red")
    assert uploaded == expected
    card = expected["README.md"].decode()
    assert "library_name: ganrm" in card and "red squares" in card and "val_auc" in card
    assert "GANRewardModel.from_pretrained" in card and "ComfyUI" in card


def test_gradients_reach_the_head_only(model):
    logits = model(torch.rand(2, 3, 32, 32))
    logits.sum().backward()
    assert all(parameter.grad is not None for parameter in model.head.parameters())
    assert all(parameter.grad is None for parameter in model.encoder.parameters())


def test_numpy_and_pil_single_images(model):
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pil = to_pil(torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0)
    assert_relative_close(model.score(array), model.score(pil), SCORE_RTOL, "numpy vs PIL")


def test_backbone_weights_are_read_only_as_safetensors(tmp_path, tiny_clip_dir):
    """A pickled weights file is never read: as `pretrained`, or as the only weights of a local-dir folder."""
    import shutil

    from ganrm_diffusers.utils.errors import CheckpointError

    pickled = tmp_path / "weights.bin"
    pickled.write_bytes(b"never read")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        ClipBackbone.load("ViT-B-32", str(pickled))
    folder = tmp_path / "pickled_clip"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds weights only as pickles"):
        ClipBackbone.load(f"local-dir:{folder}", None)
    assert ClipBackbone.load(f"local-dir:{tiny_clip_dir}", None).embed_dim > 0
