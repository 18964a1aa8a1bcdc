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
    # 4 steps: the default checkpoint (30 %) falls after the first step, leaving three to prune.
    "GANRMBestOfNSampler": {"steps": 4, "cfg": 1.0},
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


def test_sd15_best_of_n_sampler_prunes_inside_sampling_and_saves_the_best(sd15_server):
    entry = run(sd15_server, workflow("sd15_best_of_n_sampler"))
    saved = comfyui_support.output_files(sd15_server.tree, entry, "9")
    assert len(saved) == 2
    for path in saved:
        with Image.open(path) as image:
            assert image.size == (64, 64)
    (summary,) = entry["outputs"]["8"]["text"]
    # 8 candidates for 1 step, then 2 for 3 steps: 14 of the 32 UNet evaluations of best-of-8 (cfg 1: one row each).
    assert "14 rows through the model, 0.438x full best-of-N (32)" in summary
    assert len(entry["outputs"]["8"]["images"]) == 1  # the preview of every candidate with its score


def test_a_reduced_depth_flux_loads_through_unet_loader_and_prunes(sd15_server, tmp_path_factory):
    """FLUX.1 [dev]'s real width (3072, 24 heads) with one double and one single block (ComfyUI's model detection
    reads the depth from the file), through the stock UNETLoader; text conditionings and a TAESD from the tests'
    pack stand in for T5 and the FLUX VAE, which do not fit a test."""
    file = sd15_server.tree / "models" / "diffusion_models" / "flux-reduced.safetensors"
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        comfyui_support.write_reduced_flux(sd15_server.tree, file)
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": file.name, "weight_dtype": "default"}},
        "2": {
            "class_type": "GANRMTestConditioning",
            "inputs": {"context_dim": 64, "pooled_dim": 64, "guidance": 3.5, "seed": 0},
        },
        "3": {"class_type": "GANRMTestTinyVAE", "inputs": {"latent_channels": 16, "seed": 0}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "GANRMLoadRewardModel", "inputs": {"model_name": "my-style"}},
    }
    sampler = {
        "model": ["1", 0],
        "positive": ["2", 0],
        "negative": ["2", 1],
        "latent_image": ["4", 0],
        "vae": ["3", 0],
        "reward_model": ["7", 0],
        "seed": 3,
        "steps": 4,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
        "num_candidates": 4,
        "top_k": 1,
        "pruning": "custom",
        "checkpoints": "0.25",
        "keep": "1",
        "fk_lambda": 1.0,
        "fk_potential": "max",
    }
    graph["8"] = {"class_type": "GANRMBestOfNSampler", "inputs": sampler}
    entry = run(sd15_server, graph)
    (summary,) = entry["outputs"]["8"]["text"]
    assert "7 rows through the model, 0.438x full best-of-N (16)" in summary  # 4 candidates x 1 step, then 1 x 3
    assert "model_type FLUX" in sd15_server.log_tail(200_000)  # what ComfyUI's model detection made of the file


def test_the_server_log_shows_no_traceback(sd15_server):
    log = sd15_server.log_path.read_text(errors="replace")
    tracebacks = [block for block in log.split("Traceback")[1:] if "torchaudio" not in block]
    assert not tracebacks, tracebacks[0][:3000]
