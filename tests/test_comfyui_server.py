"""The ganrm node pack in a real ComfyUI server (`main.py --cpu` on a loopback port, the pack under custom_nodes/):
/object_info, graphs through POST /prompt and GET /history, and bad graphs that must never kill the server."""

from __future__ import annotations

import shutil

import comfyui_support
import pytest
from conftest import COMFYUI_BACKBONE, make_property_images, write_images
from test_comfyui_sampler import sampler_graph

pytestmark = pytest.mark.comfyui


def noisy_images(count: int, size: int = 48, seed: int = 0) -> dict:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": count, "color": 0x808080},
        },
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": seed, "strength": 0.4}},
    }


def good_graph(seed: int = 0) -> dict:
    return noisy_images(6, seed=seed) | {
        "10": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": "tiny"}},
        "20": {
            "class_type": "GANRMBestOfN",
            "inputs": {
                "reward_model": ["10", 0],
                "images": ["2", 0],
                "top_k": 2,
                "group_size": 3,
                "use_threshold": False,
                "threshold": 0.0,
            },
        },
        "21": {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": f"best-{seed}"}},
        "30": {"class_type": "GANRMScoreImages", "inputs": {"reward_model": ["10", 0], "images": ["2", 0]}},
    }


def assert_runs_a_good_prompt(server: comfyui_support.ComfyUIServer, seed: int) -> None:
    entry = server.run_prompt(good_graph(seed))
    assert entry["status"]["status_str"] == "success", comfyui_support.history_error(entry)
    saved = comfyui_support.output_files(server.tree, entry, "21")
    assert len(saved) == 4 and all(path.is_file() for path in saved)  # top 2 of each of 2 groups
    assert len(entry["outputs"]["30"]["text"][0].splitlines()) == 1 + 6


def test_object_info_lists_every_node_with_its_types(comfyui_server):
    info = comfyui_server.object_info()
    loader, score = info["GANRMLoadRewardModel"], info["GANRMScoreImages"]
    best, train = info["GANRMBestOfN"], info["GANRMTrainRewardModel"]
    assert {node["category"] for node in (loader, score, best, train)} == {"ganrm"}
    assert {node["python_module"] for node in (loader, score, best, train)} == {"custom_nodes.ganrm"}

    assert loader["input"]["required"]["model_name"][0] == "COMBO"
    assert {"tiny", "tiny-prompt-aware"} <= set(loader["input"]["required"]["model_name"][1]["options"])
    assert loader["output"] == ["GANRM_REWARD_MODEL"]

    assert score["input"]["required"]["reward_model"][0] == "GANRM_REWARD_MODEL"
    assert score["input"]["required"]["images"][0] == "IMAGE"
    assert score["input"]["optional"]["prompt"][0] == "STRING"
    assert score["output"] == ["FLOAT", "STRING"] and score["output_is_list"] == [True, False]
    assert score["output_node"] is True

    assert best["input"]["optional"]["latent"][0] == "LATENT"
    assert [best["input"]["required"][name][0] for name in ("top_k", "group_size", "use_threshold", "threshold")] == [
        "INT",
        "INT",
        "BOOLEAN",
        "FLOAT",
    ]
    assert best["output"] == ["IMAGE", "LATENT", "FLOAT", "IMAGE"]
    assert best["output_is_list"] == [False, False, True, False]
    assert best["output_name"] == ["images", "latent", "scores", "rejected"]

    assert train["input"]["required"]["negatives"][0] == "IMAGE"
    assert train["input"]["optional"]["positives"][0] == "IMAGE"
    assert train["output"] == ["GANRM_REWARD_MODEL", "STRING"]


def test_object_info_describes_the_best_of_n_sampler_like_ksampler(comfyui_server):
    info = comfyui_server.object_info()
    sampler, core = info["GANRMBestOfNSampler"], info["KSampler"]
    required = sampler["input"]["required"]
    for name in ("model", "positive", "negative", "seed", "steps", "cfg", "denoise"):
        assert required[name][0] == core["input"]["required"][name][0], name
    assert required["sampler_name"][1]["options"] == core["input"]["required"]["sampler_name"][0]
    assert required["scheduler"][1]["options"] == core["input"]["required"]["scheduler"][0]
    assert [required[name][0] for name in ("latent_image", "vae", "reward_model")] == [
        "LATENT",
        "VAE",
        "GANRM_REWARD_MODEL",
    ]
    assert required["pruning"][1]["options"] == ["default", "off", "custom", "fk"]
    assert sampler["output"] == ["LATENT", "IMAGE", "FLOAT", "STRING"]
    assert sampler["output_is_list"] == [False, False, True, False]
    assert sampler["output_node"] is True and sampler["category"] == "ganrm"
    assert "LatentFromBatch" in sampler["description"] and "dpm_adaptive" in sampler["description"]


def test_server_imported_the_pack_without_failure(comfyui_server):
    log = comfyui_server.log_path.read_text(errors="replace")
    import_lines = [line for line in log.splitlines() if "custom_nodes/ganrm" in line and "seconds" in line]
    assert import_lines and "IMPORT FAILED" not in import_lines[0], log[-3000:]


def test_a_graph_of_core_nodes_and_ours_runs_through_prompt_and_history(comfyui_server):
    assert_runs_a_good_prompt(comfyui_server, seed=1)


def _write_corrupt_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing readable


def _missing_reward_model(tree, backbone):
    graph = good_graph()
    graph["10"]["inputs"]["model_name"] = "does-not-exist"
    return graph


def _wrong_input_type(tree, backbone):
    graph = good_graph()
    graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    graph["30"]["inputs"]["images"] = ["5", 0]
    del graph["20"], graph["21"]  # with another valid output ComfyUI would run that one and answer 200
    return graph


def _corrupt_checkpoint(tree, backbone):
    folder = tree / "models" / "reward_models" / "corrupt"
    shutil.copytree(tree / "models" / "reward_models" / "tiny", folder, dirs_exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"garbage")
    graph = good_graph()
    graph["10"]["inputs"]["model_name"] = "corrupt"
    return graph


def _corrupt_image(tree, backbone):
    _write_corrupt_image(tree / "input" / "corrupt.png")
    graph = good_graph()
    graph["2"] = {"class_type": "LoadImage", "inputs": {"image": "corrupt.png"}}
    return graph


def _train_graph(folder: str, backbone: str) -> dict:
    return noisy_images(12) | {
        "40": {
            "class_type": "GANRMTrainRewardModel",
            "inputs": {
                "negatives": ["2", 0],
                "name": f"trained-{folder.rstrip('/').rsplit('/', 1)[-1]}",
                "positives_folder": folder,
                "backbone": backbone,
                "pretrained": "none",
                "max_epochs": 5,
                "seed": 0,
                "overwrite": False,
            },
        },
    }


def _corrupt_target_images(tree, backbone):
    for index in range(3):
        _write_corrupt_image(tree / "input" / "corrupt-targets" / f"{index}.png")
    return _train_graph("corrupt-targets", backbone)


def _empty_target_folder(tree, backbone):
    (tree / "input" / "empty-targets").mkdir(parents=True, exist_ok=True)
    return _train_graph("empty-targets", backbone)


def _empty_negatives_batch(tree, backbone):
    write_images(tree / "input" / "few-targets", make_property_images(10, True, seed=1))
    graph = _train_graph("few-targets", backbone)
    graph["1"]["inputs"]["batch_size"] = 2  # fewer generations than training needs
    return graph


def _sampler_top_k_above_candidates(tree, backbone):
    return sampler_graph(top_k=9)


def _sampler_checkpoint_past_the_last_step(tree, backbone):
    return sampler_graph(pruning="custom", checkpoints="0.99", keep="2")


def _sampler_without_reward_model(tree, backbone):
    graph = sampler_graph()
    del graph["20"]["inputs"]["reward_model"]
    return graph


def _loader_without_model_name(tree, backbone):
    graph = good_graph()
    del graph["10"]["inputs"]["model_name"]
    return graph


def _sampler_on_an_empty_latent(tree, backbone):
    import torch
    from safetensors.torch import save_file

    save_file(
        {"latent_tensor": torch.zeros(0, 4, 8, 8), "latent_format_version_0": torch.tensor([])},
        str(tree / "input" / "empty.latent"),
    )
    graph = sampler_graph()
    graph["2"] = {"class_type": "LoadLatent", "inputs": {"latent": "empty.latent"}}
    return graph


def _targets_outside_the_input_folder(tree, backbone):
    outside = tree.parent / "private-images"
    write_images(outside, make_property_images(10, True, seed=3))
    return _train_graph(str(outside), backbone)


def _targets_escaping_the_input_folder(tree, backbone):
    write_images(tree.parent / "escaped", make_property_images(10, True, seed=4))
    write_images(tree / "input" / "fine", make_property_images(10, True, seed=4))
    return _train_graph("fine/../../../escaped", backbone)


def _backbone_outside_the_model_folders(tree, backbone):
    write_images(tree / "input" / "targets-ok", make_property_images(10, True, seed=5))
    outside = tree.parent / "private-clip"
    shutil.copytree(tree / "models" / "reward_backbones" / "tiny-clip", outside, dirs_exist_ok=True)
    return _train_graph("targets-ok", f"local-dir:{outside}")


# (how the graph is broken, where ComfyUI must report it, words the report must contain)
BAD_GRAPHS = [
    (_sampler_top_k_above_candidates, "validation", "top_k 9 must be between 1 and num_candidates 8"),
    (_sampler_checkpoint_past_the_last_step, "validation", "falls on the last of the 10 steps"),
    (_sampler_without_reward_model, "validation", "reward_model"),
    (_loader_without_model_name, "validation", "model_name"),
    (_sampler_on_an_empty_latent, "execution", "the LATENT batch is empty"),
    (_targets_outside_the_input_folder, "execution", "is outside ComfyUI's input folder"),
    (_targets_escaping_the_input_folder, "execution", "is outside ComfyUI's input folder"),
    (_backbone_outside_the_model_folders, "execution", "is outside ComfyUI's model folders"),
    (_missing_reward_model, "validation", "'does-not-exist' is not in the reward_models folders"),
    (_wrong_input_type, "validation", "LATENT"),
    (_corrupt_checkpoint, "execution", "corrupt/model.safetensors"),
    (_corrupt_image, "execution", "corrupt.png"),
    (_corrupt_target_images, "execution", "0 readable image(s)"),
    (_empty_target_folder, "execution", "holds no image files"),
    (_empty_negatives_batch, "execution", "the negatives batch has 2 image(s); at least 8 are needed"),
]


@pytest.mark.parametrize(
    ("make_graph", "stage", "words"), BAD_GRAPHS, ids=[case[0].__name__[1:] for case in BAD_GRAPHS]
)
def test_a_bad_graph_is_reported_and_the_server_runs_the_next_prompt(comfyui_server, make_graph, stage, words):
    status, answer = comfyui_server.queue_prompt(make_graph(comfyui_server.tree, COMFYUI_BACKBONE))
    if stage == "validation":
        assert status == 400
        details = [error["details"] for node in answer["node_errors"].values() for error in node["errors"]]
        assert any(words in detail for detail in details), answer
    else:
        assert status == 200, answer
        entry = comfyui_server.wait_for_history(answer["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        error = comfyui_support.history_error(entry)
        assert words in error["exception_message"], error
    assert comfyui_server.alive
    assert_runs_a_good_prompt(comfyui_server, seed=len(words))
