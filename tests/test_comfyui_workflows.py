"""End to end: the workflows of workflows/ (API format) run in a real ComfyUI server on a checkpoint of the real
SD1.5 architecture with random weights (built once and cached, see comfyui_support.ensure_random_sd15_checkpoint),
at 64x64 pixels and 2 steps on the CPU. The graphs are the committed files; only sizes, steps and the reward model's
backbone are turned down for a CPU.

Slow (about 3 minutes, plus 75 s to build the checkpoint the first time): `make test-comfyui-e2e` runs it; set
GANRM_COMFYUI_E2E=1 to run it from pytest.
"""

from __future__ import annotations

import json

import comfyui_support
import numpy as np
import pytest
import torch
from conftest import COMFYUI_BACKBONE, make_property_images, write_images
from PIL import Image

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    # Opt-in (conftest.py): `make test` skips these minutes-long runs, also under CI, because .ci/run runs them in
    # `make test-comfyui-e2e`, which sets the variable. The only skip CI accepts.
    pytest.mark.opt_in("GANRM_COMFYUI_E2E", reason="SD1.5 end-to-end runs: `make test-comfyui-e2e`"),
]

CPU_SETTINGS = {
    "EmptyLatentImage": {"width": 64, "height": 64},
    # cfg 1 lets ComfyUI skip the unconditional pass: half the UNet calls on a CPU.
    "KSampler": {"steps": 2, "cfg": 1.0},
}


def workflow(name: str, **settings: dict) -> dict:
    graph = json.loads((comfyui_support.REPO_ROOT / "workflows" / f"{name}.api.json").read_text())
    for node in graph.values():
        node["inputs"].update(CPU_SETTINGS.get(node["class_type"], {}))
        node["inputs"].update(settings.get(node["class_type"], {}))
    return graph


def models_named_in(name: str) -> dict[str, str]:
    graph = workflow(name)
    names = {}
    for node in graph.values():
        for key in ("ckpt_name", "lora_name"):
            if key in node["inputs"]:
                names[key] = node["inputs"][key]
    return names


@pytest.fixture(scope="module")
def sd15_server(tmp_path_factory, comfyui_source, comfyui_reward_models):
    """A server whose models folders hold the random SD1.5 checkpoint and LoRA under the names the workflows use."""
    from conftest import prepare_comfyui_tree

    checkpoint = comfyui_support.ensure_random_sd15_checkpoint()
    workdir = tmp_path_factory.mktemp("comfyui_sd15")
    tree = prepare_comfyui_tree(comfyui_source, workdir / "comfyui", {"my-style": comfyui_reward_models["tiny"]})
    names = models_named_in("sd15_lora_best_of_n")
    comfyui_support.link_model(tree, "checkpoints", checkpoint, names["ckpt_name"])
    comfyui_support.link_model(tree, "loras", checkpoint.with_name(comfyui_support.SD15_LORA_NAME), names["lora_name"])
    with comfyui_support.running_server(tree, workdir / "server.log") as server:
        yield server


def run(server, graph: dict) -> dict:
    entry = server.run_prompt(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", (comfyui_support.history_error(entry), server.log_tail())
    return entry


def test_sd15_batch_best_of_n_save(sd15_server):
    entry = run(sd15_server, workflow("sd15_best_of_n", EmptyLatentImage={"batch_size": 4}, GANRMBestOfN={"top_k": 2}))
    best = comfyui_support.output_files(sd15_server.tree, entry, "9")
    rejected = comfyui_support.output_files(sd15_server.tree, entry, "10")
    assert len(best) == 2 and len(rejected) == 2
    for path in best + rejected:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    (grid,) = comfyui_support.output_files(sd15_server.tree, entry, "8")  # the preview with scores
    assert grid.is_file()


def test_train_reward_model_from_a_target_folder_and_a_generated_batch(sd15_server, tiny_backbone):
    write_images(sd15_server.tree / "input" / "ganrm_targets", make_property_images(12, True, seed=21, size=64))
    graph = workflow(
        "train_reward_model",
        EmptyLatentImage={"batch_size": 8},
        GANRMTrainRewardModel={
            "backbone": COMFYUI_BACKBONE,
            "pretrained": "none",
            "max_epochs": 30,
            "name": "trained-in-comfyui",
        },
    )
    entry = run(sd15_server, graph)
    saved = sd15_server.tree / "models" / "reward_models" / "trained-in-comfyui"
    assert (saved / "model.safetensors").is_file() and (saved / "training_curves.png").is_file()
    config = json.loads((saved / "config.json").read_text())
    assert config["training"]["negatives"]["count"] == 8 and config["training"]["positives"]["count"] == 12
    summary = entry["outputs"]["8"]["text"][0]
    assert summary.startswith("8 images scored by trained-in-comfyui")


def test_sd15_with_a_lora_from_our_trainers_then_best_of_n(sd15_server):
    log_before = len(sd15_server.log_path.read_text(errors="replace"))
    with_lora = run(sd15_server, workflow("sd15_lora_best_of_n", EmptyLatentImage={"batch_size": 2}))
    new_log = sd15_server.log_path.read_text(errors="replace")[log_before:]
    assert "lora key not loaded" not in new_log and "ERROR" not in new_log, new_log[-3000:]
    without_lora = run(
        sd15_server,
        workflow("sd15_lora_best_of_n", EmptyLatentImage={"batch_size": 2}, LoraLoader={"strength_model": 0.0}),
    )

    def saved_pixels(entry):
        (path,) = comfyui_support.output_files(sd15_server.tree, entry, "9")
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image, dtype=np.float32))

    # Same seed, same prompt: only the LoRA differs, and it must change the picture.
    assert not torch.equal(saved_pixels(with_lora), saved_pixels(without_lora))


def test_the_server_log_shows_no_traceback(sd15_server):
    log = sd15_server.log_path.read_text(errors="replace")
    tracebacks = [block for block in log.split("Traceback")[1:] if "torchaudio" not in block]
    assert not tracebacks, tracebacks[0][:3000]
