"""The ganrm node pack inside the real ComfyUI (0.3.75), in this process: loaded by ComfyUI's own loader,
graphs of core nodes and ours validated by execution.validate_prompt and run by execution.PromptExecutor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import comfyui_support
import pytest
import torch
from checks import assert_relative_close
from conftest import COMFYUI_BACKBONE, make_property_images, write_images

pytestmark = pytest.mark.comfyui
# Scores the nodes compute against the library's scores of the same images: another path (ComfyUI's model
# management, NHWC tensors, other batches), so equal up to float32 order, as a whole vector.
SCORE_RTOL = 1e-4

NODE_IDS = ("GANRMLoadRewardModel", "GANRMScoreImages", "GANRMBestOfN", "GANRMTrainRewardModel")


def noisy_images(count: int, seed: int = 0, size: int = 64) -> dict:
    """Graph nodes "1" (a gray batch) and "2" (each image with its own noise): distinct images from core nodes."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": count, "color": 0x808080},
        },
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": seed, "strength": 0.4}},
    }


def loader(name: str = "tiny") -> dict:
    return {"10": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": name}}}


def best_of_n(**inputs) -> dict:
    settings = {
        "reward_model": ["10", 0],
        "images": ["2", 0],
        "top_k": 1,
        "group_size": 0,
        "use_threshold": False,
        "threshold": 0.0,
    }
    return {"20": {"class_type": "GANRMBestOfN", "inputs": settings | inputs}}


def direct_scores(
    comfyui_reward_models: dict[str, Path], images: torch.Tensor, name: str = "tiny", prompts=None
) -> torch.Tensor:
    """The same checkpoint's scores computed by the library alone, outside ComfyUI."""
    from ganrm_diffusers.reward.model import GANRewardModel

    model = GANRewardModel.from_pretrained(comfyui_reward_models[name])
    return model.score(images.movedim(-1, 1), prompts)


def test_pack_loads_through_comfyuis_own_loader_as_v3_nodes(comfyui):
    from comfy_api.latest import io

    assert comfyui.pack_loaded
    for node_id in NODE_IDS:
        node = comfyui.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert issubclass(node, io.ComfyNode)
        assert node.GET_SCHEMA().category == "ganrm"
        assert comfyui.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("GAN-RM ")
    assert comfyui.folder_paths.get_folder_paths("reward_models")[0] == str(comfyui.tree / "models" / "reward_models")


def test_pack_import_loads_no_model_and_opens_no_connection(comfyui_source, tmp_path):
    """Loading the pack in a fresh ComfyUI with sockets and every model loader booby-trapped still succeeds."""
    tree = comfyui_support.prepare_tree(
        comfyui_source, tmp_path / "comfyui", {comfyui_support.PACK_NAME: comfyui_support.REPO_ROOT}
    )
    script = f"""
import socket, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import comfyui_support
comfy = comfyui_support.InProcessComfyUI(comfyui_support.Path({str(tree)!r})).start()
def refuse(*args, **kwargs):
    raise AssertionError("touched at import time")
socket.socket.connect = refuse
socket.create_connection = refuse
import open_clip, ganrm_diffusers.reward.model as reward_model
open_clip.create_model = refuse
reward_model.GANRewardModel.from_pretrained = classmethod(refuse)
reward_model.ClipBackbone.load = classmethod(refuse)
ok = comfy.load_pack(comfyui_support.Path({str(tree / "custom_nodes" / "ganrm")!r}))
print("PACK_LOADED" if ok and "GANRMBestOfN" in comfy.nodes.NODE_CLASS_MAPPINGS else "PACK_FAILED")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "PACK_LOADED" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_score_node_scores_every_image_with_the_library_scorer(comfyui, comfyui_reward_models):
    graph = (
        noisy_images(5)
        | loader()
        | {
            "30": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["2", 0]}},
        }
    )
    run = comfyui.run(graph)
    assert run.success, run.error
    images = run.outputs["2"][0][0]
    scores, summary = run.outputs["30"]
    assert len(scores) == 5  # every image, not the first one or the batch mean
    expected = direct_scores(comfyui_reward_models, images)
    assert_relative_close(torch.tensor(scores), expected, rtol=SCORE_RTOL, what="node scores vs library scores")
    assert len(set(round(value, 6) for value in scores)) == 5
    assert summary[0].splitlines()[0].startswith("5 images scored by tiny")
    assert run.ui["30"]["text"] == summary


def test_best_of_n_keeps_the_top_k_of_each_group(comfyui, comfyui_reward_models):
    from ganrm_diffusers.generation.selection import select_top_k

    graph = (
        noisy_images(6, seed=3)
        | loader()
        | best_of_n(top_k=1, group_size=3)
        | {
            "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "best"}},
            "22": {"class_type": "SaveImage", "inputs": {"images": ["20", 3], "filename_prefix": "rejected"}},
        }
    )
    run = comfyui.run(graph)
    assert run.success, run.error
    images = run.outputs["2"][0][0]
    outputs = run.outputs["20"]  # one list per output slot: images, latent, scores (a list output), rejected
    kept, kept_scores, rejected = outputs[0][0], outputs[2], outputs[3][0]
    expected = select_top_k(direct_scores(comfyui_reward_models, images), 1, group_size=3)
    assert torch.equal(kept, images[expected.selected])  # the input images themselves, bit for bit
    assert torch.equal(rejected, images[expected.rejected])
    assert_relative_close(torch.tensor(kept_scores), expected.scores, rtol=SCORE_RTOL, what="kept scores")
    assert len(run.ui["21"]["images"]) == 2 and len(run.ui["22"]["images"]) == 4
    (preview,) = run.ui["20"]["images"]  # the score grid
    assert (comfyui.tree / "temp" / preview["filename"]).is_file()


def test_best_of_n_latent_output_follows_the_selected_images(comfyui):
    best = comfyui.nodes.NODE_CLASS_MAPPINGS["GANRMBestOfN"]
    handle = comfyui_models().load("tiny")
    images = torch.rand(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    latent = {
        "samples": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 4, 4).clone(),
        "noise_mask": torch.arange(4.0).view(4, 1, 1),
        "batch_index": [10, 11, 12, 13],
    }
    output = best.execute(handle, images, top_k=2, group_size=0, use_threshold=False, threshold=0.0, latent=latent)
    chosen = handle.score(images).argsort(descending=True)[:2]
    selected_latent = output.args[1]
    assert selected_latent["samples"][:, 0, 0, 0].tolist() == chosen.float().tolist()
    assert selected_latent["noise_mask"][:, 0, 0].tolist() == chosen.float().tolist()
    assert selected_latent["batch_index"] == [10 + index for index in chosen.tolist()]

    with pytest.raises(Exception, match="LATENT batch has 3 latents for 4 images"):
        best.execute(
            handle,
            images,
            top_k=1,
            group_size=0,
            use_threshold=False,
            threshold=0.0,
            latent={"samples": torch.zeros(3, 4, 4, 4)},
        )


def comfyui_models():
    from ganrm_nodes import models

    return models


def test_best_of_n_threshold_skips_saving_when_no_image_passes(comfyui):
    graph = (
        noisy_images(3)
        | loader()
        | best_of_n(use_threshold=True, threshold=999.0)
        | {
            "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "never"}},
            "22": {"class_type": "SaveImage", "inputs": {"images": ["20", 3], "filename_prefix": "all-rejected"}},
        }
    )
    run = comfyui.run(graph)
    assert run.success, run.error
    assert "21" not in run.ui or not run.ui["21"]
    assert len(run.ui["22"]["images"]) == 3
    assert not list((comfyui.tree / "output").glob("never*"))


def test_best_of_n_without_latent_input_names_the_missing_latent(comfyui):
    graph = (
        noisy_images(2)
        | loader()
        | best_of_n()
        | {
            "21": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": "latent"}},
        }
    )
    run = comfyui.run(graph)
    errors = [data["exception_message"] for event, data in run.messages if event == "execution_error"]
    assert errors and "has no LATENT input" in errors[0]


def test_missing_reward_model_fails_validation_naming_the_input(comfyui):
    graph = (
        noisy_images(2)
        | loader("no-such-model")
        | best_of_n()
        | {
            "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "x"}},
        }
    )
    valid, _error, _outputs, node_errors = comfyui.validate(graph)
    assert not valid
    (reason,) = node_errors["10"]["errors"]
    assert reason["type"] == "custom_validation_failed"
    assert "'no-such-model' is not in the reward_models folders" in reason["details"]


def test_wrong_input_type_fails_validation(comfyui):
    graph = (
        noisy_images(2)
        | loader()
        | {
            "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
            "30": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["3", 0]}},
        }
    )
    valid, _error, _outputs, node_errors = comfyui.validate(graph)
    assert not valid
    assert node_errors["30"]["errors"][0]["type"] == "return_type_mismatch"
    assert "LATENT" in node_errors["30"]["errors"][0]["details"]


def test_corrupt_checkpoint_is_an_execution_error_naming_it(comfyui):
    folder = comfyui.tree / "models" / "reward_models" / "corrupt"
    folder.mkdir(exist_ok=True)
    shutil.copy(comfyui.tree / "models" / "reward_models" / "tiny" / "config.json", folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    graph = (
        noisy_images(2)
        | loader("corrupt")
        | best_of_n()
        | {
            "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "x"}},
        }
    )
    run = comfyui.run(graph)
    assert not run.success
    assert run.error["node_id"] == "10"
    assert run.error["exception_type"].endswith("CheckpointError")
    assert "corrupt/model.safetensors" in run.error["exception_message"]


def test_reward_model_goes_through_comfyui_model_management(comfyui):
    import comfy.model_management as model_management

    handle = comfyui_models().load("tiny")
    images = torch.rand(3, 48, 48, 3, generator=torch.Generator().manual_seed(1))
    first = handle.score(images)
    assert any(patcher is handle.patcher for patcher in model_management.loaded_models())
    model_management.unload_all_models()  # what ComfyUI does when memory runs short
    assert not any(patcher is handle.patcher for patcher in model_management.loaded_models())
    assert torch.equal(handle.score(images), first)
    assert handle.dtype == torch.float32  # no fp16 on a CPU


def test_loader_reloads_a_checkpoint_retrained_under_the_same_name(comfyui, tiny_backbone):
    from conftest import _tiny_reward_model

    target = comfyui.tree / "models" / "reward_models" / "retrained"
    _tiny_reward_model(tiny_backbone, seed=5).save_pretrained(target)
    graph = (
        noisy_images(3)
        | loader("retrained")
        | {
            "30": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["2", 0]}},
        }
    )
    before = comfyui.run(graph).outputs["30"][0]
    _tiny_reward_model(tiny_backbone, seed=6).save_pretrained(target)
    after = comfyui.run(graph).outputs["30"][0]
    assert before != after


def test_loader_offers_reward_models_from_the_hub_cache(comfyui, comfyui_reward_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--ganrm-tiny"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in comfyui_reward_models["tiny"].iterdir():  # the cache layout: blobs, linked from snapshots
        blob = repo / "blobs" / file.name.replace(".", "-")
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    not_a_reward_model = tmp_path / "hub" / "models--someone--other" / "snapshots" / commit
    not_a_reward_model.mkdir(parents=True)
    (not_a_reward_model / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    assert "hub:someone/ganrm-tiny" in comfyui_models().available_models()
    assert "hub:someone/other" not in comfyui_models().available_models()
    graph = (
        noisy_images(2)
        | loader("hub:someone/ganrm-tiny")
        | {
            "30": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["2", 0]}},
        }
    )
    run = comfyui.run(graph)
    assert run.success, run.error
    expected = direct_scores(comfyui_reward_models, run.outputs["2"][0][0])
    assert_relative_close(torch.tensor(run.outputs["30"][0]), expected, rtol=SCORE_RTOL, what="scores of a Hub model")


def test_prompt_aware_model_needs_and_uses_the_prompt(comfyui, comfyui_reward_models):
    score = {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["2", 0]}}
    graph = noisy_images(4) | loader("tiny-prompt-aware") | {"30": score}
    run = comfyui.run(graph)
    assert not run.success and "prompt-aware" in run.error["exception_message"]

    graph["30"] = {**score, "inputs": {**score["inputs"], "prompt": "a red apple"}}
    run = comfyui.run(graph)
    assert run.success, run.error
    expected = direct_scores(comfyui_reward_models, run.outputs["2"][0][0], "tiny-prompt-aware", "a red apple")
    assert_relative_close(torch.tensor(run.outputs["30"][0]), expected, rtol=SCORE_RTOL, what="prompt-aware scores")

    # One line per group: each group of the batch is scored against its own prompt.
    graph |= best_of_n(top_k=2, group_size=2, prompt="a red apple\na blue car")
    graph["10"]["inputs"]["model_name"] = "tiny-prompt-aware"
    graph["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "groups"}}
    run = comfyui.run(graph)
    assert run.success, run.error
    images = run.outputs["2"][0][0]
    expected = direct_scores(
        comfyui_reward_models, images, "tiny-prompt-aware", ["a red apple"] * 2 + ["a blue car"] * 2
    )
    assert_relative_close(
        torch.tensor(run.outputs["20"][2]).sort().values, expected.sort().values, rtol=SCORE_RTOL, what="group scores"
    )


# ------------------------------------------------------------------------------------------------------------
# Training inside ComfyUI


def train_graph(tiny_clip_dir: Path, name: str, folder: str, **inputs) -> dict:
    settings = {
        "negatives": ["2", 0],
        "name": name,
        "positives_folder": folder,
        "backbone": COMFYUI_BACKBONE,
        "pretrained": "none",
        "max_epochs": 40,
        "seed": 0,
        "overwrite": False,
    }
    return noisy_images(16, seed=7, size=40) | {
        "40": {"class_type": "GANRMTrainRewardModel", "inputs": settings | inputs},
        "41": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["40", 0], "images": ["2", 0]}},
    }


@pytest.fixture
def progress_calls(comfyui):
    import comfy.utils

    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(previous)


def test_train_node_saves_a_reward_model_from_a_target_folder(comfyui, tiny_clip_dir, progress_calls):
    write_images(comfyui.tree / "input" / "targets", make_property_images(16, True, seed=11))
    run = comfyui.run(train_graph(tiny_clip_dir, "from-folder", "targets"))
    assert run.success, run.error
    saved = comfyui.tree / "models" / "reward_models" / "from-folder"
    assert {"config.json", "model.safetensors", "metrics.json", "training_curves.png"} <= {
        path.name for path in saved.iterdir()
    }
    assert "from-folder" in comfyui_models().available_models()  # the Loader offers it at once
    summary = run.outputs["40"][1][0]
    assert str(saved) in summary and "held-out AUC" in summary
    assert len(run.outputs["41"][0]) == 16  # the trained model scores in the same graph
    assert progress_calls and progress_calls[-1][0] <= progress_calls[-1][1] == 40
    assert [value for value, _ in progress_calls] == sorted(value for value, _ in progress_calls)
    (preview,) = run.ui["40"]["images"]
    assert (comfyui.tree / "temp" / preview["filename"]).is_file()

    again = comfyui.run(train_graph(tiny_clip_dir, "from-folder", "targets", seed=1))
    assert not again.success and "already exists" in again.error["exception_message"]
    assert comfyui.run(train_graph(tiny_clip_dir, "from-folder", "targets", seed=1, overwrite=True)).success


def test_train_node_takes_positives_as_an_image_batch(comfyui, tiny_clip_dir):
    graph = train_graph(tiny_clip_dir, "from-batch", "") | {
        "5": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 40, "batch_size": 16, "color": 0xE01010}},
        "6": {"class_type": "ImageAddNoise", "inputs": {"image": ["5", 0], "seed": 2, "strength": 0.2}},
    }
    graph["40"]["inputs"]["positives"] = ["6", 0]
    run = comfyui.run(graph)
    assert run.success, run.error
    assert (comfyui.tree / "models" / "reward_models" / "from-batch" / "model.safetensors").is_file()


def test_train_node_honours_interrupt_and_saves_nothing(comfyui, tiny_clip_dir, progress_calls):
    import comfy.utils

    write_images(comfyui.tree / "input" / "targets-interrupt", make_property_images(16, True, seed=12))

    def interrupt_at_step_3(value, total, preview, node_id=None):
        if value == 3:
            comfyui.nodes.interrupt_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_at_step_3)
    run = comfyui.run(train_graph(tiny_clip_dir, "interrupted", "targets-interrupt", max_epochs=500))
    assert not run.success
    assert any(event == "execution_interrupted" for event, _ in run.messages)
    assert not (comfyui.tree / "models" / "reward_models" / "interrupted").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "holds no image files"),
        ("corrupt", "0 readable image(s); at least 8 are needed (3 unreadable file(s) skipped)"),
        ("missing", "does not exist"),
    ],
)
def test_train_node_names_a_bad_target_folder(comfyui, tiny_clip_dir, case, message):
    folder = comfyui.tree / "input" / f"bad-{case}"
    if case != "missing":
        folder.mkdir()
    if case == "corrupt":
        for index in range(3):
            (folder / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = comfyui.run(train_graph(tiny_clip_dir, f"bad-{case}", f"bad-{case}"))
    assert not run.success
    assert run.error["node_id"] == "40" and run.error["exception_type"].endswith("ImageInputError")
    assert message in run.error["exception_message"] and f"bad-{case}" in run.error["exception_message"]


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", ""])
def test_train_node_refuses_names_outside_reward_models(comfyui, tiny_clip_dir, name):
    run = comfyui.run(train_graph(tiny_clip_dir, name, "targets"))
    assert not run.success and "plain folder name" in run.error["exception_message"]


def test_empty_image_batch_is_an_error_naming_it(comfyui):
    score = comfyui.nodes.NODE_CLASS_MAPPINGS["GANRMScoreImages"]
    with pytest.raises(Exception, match="IMAGE batch is empty"):
        score.execute(comfyui_models().load("tiny"), torch.zeros(0, 64, 64, 3))


# ------------------------------------------------------------------------------------------------------------
# A server others can reach reads only its own folders


def test_train_node_reads_targets_only_inside_the_input_folder(comfyui, tmp_path, monkeypatch):
    outside = tmp_path / "private"
    write_images(outside, make_property_images(10, True, seed=21))
    for folder in (str(outside), "../../" + str(outside.relative_to(outside.anchor))):
        run = comfyui.run(train_graph(None, "outside", folder))
        assert not run.success and run.error["exception_type"].endswith("PathNotAllowedError")
        assert "is outside ComfyUI's input folder" in run.error["exception_message"]
        assert "GANRM_COMFYUI_ALLOW_ANY_PATH=1" in run.error["exception_message"]
    assert not (comfyui.tree / "models" / "reward_models" / "outside").exists()

    monkeypatch.setenv("GANRM_COMFYUI_ALLOW_ANY_PATH", "1")  # the owner of a private server opts in
    assert comfyui.run(train_graph(None, "outside", str(outside))).success


@pytest.mark.parametrize("field", ["backbone", "pretrained"])
def test_train_node_reads_backbones_only_from_the_model_folders(comfyui, tiny_clip_dir, field):
    write_images(comfyui.tree / "input" / "targets-backbone", make_property_images(10, True, seed=22))
    if field == "backbone":
        inputs = {"backbone": f"local-dir:{tiny_clip_dir}"}
    else:  # a weights file for an architecture open_clip knows by name
        inputs = {"backbone": "ViT-B-32", "pretrained": str(tiny_clip_dir / "open_clip_model.safetensors")}
    run = comfyui.run(train_graph(None, f"outside-{field}", "targets-backbone", **inputs))
    assert not run.success and run.error["exception_type"].endswith("PathNotAllowedError")
    assert "is outside ComfyUI's model folders" in run.error["exception_message"]


def test_train_node_accepts_weights_inside_the_model_folders_and_never_a_pickle(comfyui):
    write_images(comfyui.tree / "input" / "targets-weights", make_property_images(10, True, seed=23))
    weights = "reward_backbones/tiny-clip/open_clip_model.safetensors"
    assert comfyui.run(train_graph(None, "own-weights", "targets-weights", pretrained=weights)).success
    pickled = comfyui.tree / "models" / "reward_backbones" / "pickled-clip"
    pickled.mkdir(exist_ok=True)
    shutil.copy(comfyui.tree / "models" / "reward_backbones" / "tiny-clip" / "open_clip_config.json", pickled)
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"never read")
    graph = train_graph(None, "pickled", "targets-weights", backbone="local-dir:reward_backbones/pickled-clip")
    run = comfyui.run(graph)
    assert not run.success and "holds weights only as pickles" in run.error["exception_message"]
