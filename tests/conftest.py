"""Shared fixtures. Everything runs offline: HF_HUB_OFFLINE is set before any Hugging Face import.

Skips: a test skips only for a part missing on a developer's machine (ComfyUI, Chromium, `datasets`: see
checks.require_or_skip) or for an opt-in it is not opted into (`@pytest.mark.opt_in("VARIABLE")`: it runs where
VARIABLE=1). With CI set (.ci/run sets CI=1) every skip but the opt-ins is a failure, whatever raised it, so that
CI cannot pass by skipping; .ci/run opts into each opt-in in a run of its own (`make test-comfyui-e2e`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from checks import in_ci, require_or_skip  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A tiny open_clip architecture (about 0.1 M parameters) that builds in milliseconds.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


OPT_IN_MARKER = "opt_in"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{OPT_IN_MARKER}(variable, reason): runs only where the environment variable is 1; skipped otherwise, "
        "also under CI (CI runs it in a run of its own with the variable set)",
    )


def _opt_in_missing(item: pytest.Item) -> str | None:
    """The reason an opt-in test is not opted into, or None."""
    for marker in item.iter_markers(OPT_IN_MARKER):
        variable = marker.args[0]
        if os.environ.get(variable) != "1":
            return f"opt-in: {marker.kwargs.get('reason') or marker.args[1]} (set {variable}=1)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if (reason := _opt_in_missing(item)) is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI a skip is a failure, unless the test is an opt-in that is not opted into."""
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail") and _opt_in_missing(item) is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing may be skipped: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Under CI a module that skips itself at import (pytest.importorskip, allow_module_level) fails instead."""
    report = yield
    if report.skipped and in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI, where nothing may be skipped: {reason}"
    return report


@pytest.fixture(scope="session", autouse=True)
def _isolated_ganrm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep every cache the tests write (embeddings, configs) out of the user's home."""
    home = tmp_path_factory.mktemp("ganrm_home")
    os.environ["GANRM_HOME"] = str(home)
    return home


def write_tiny_clip(folder: Path, seed: int = 0, config: dict | None = None) -> Path:
    """An open_clip local-dir (config + safetensors weights) with random weights from `seed`."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model_cfg": config or TINY_CLIP_CONFIG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(payload))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file(
        {key: value.contiguous() for key, value in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip_dir: Path) -> str:
    """The backbone argument for GANRewardModel / `ganrm train-rm --backbone`."""
    return f"local-dir:{tiny_clip_dir}"


@pytest.fixture
def tiny_reward_model(tiny_backbone: str):
    from ganrm_diffusers.reward.model import GANRewardModel

    return GANRewardModel(backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0)


def make_property_images(count: int, with_property: bool, seed: int, size: int = 40) -> list[Image.Image]:
    """Noisy images; those 'with the property' carry a saturated red blob at a random place."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        array = rng.integers(40, 200, size=(size, size, 3)).astype(np.uint8)
        if with_property:
            top, left = rng.integers(0, size // 2, size=2)
            array[top : top + size // 2, left : left + size // 2] = (230, 20, 20)
        images.append(Image.fromarray(array))
    return images


def write_images(folder: Path, images: list[Image.Image], prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"{prefix}_{index:04d}.png")
    return folder


@pytest.fixture(scope="session")
def property_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Target images (with the property), generated-looking negatives, and held-out sets of both."""
    root = tmp_path_factory.mktemp("property_images")
    return {
        "positives": write_images(root / "positives", make_property_images(80, True, seed=1)),
        "negatives": write_images(root / "negatives", make_property_images(80, False, seed=2)),
        "pool": write_images(
            root / "pool", make_property_images(40, True, seed=3) + make_property_images(40, False, seed=4)
        ),
        "heldout_positives": write_images(root / "heldout_positives", make_property_images(40, True, seed=5)),
        "heldout_negatives": write_images(root / "heldout_negatives", make_property_images(40, False, seed=6)),
    }


# --------------------------------------------------------------------------------------------------------------
# The real ComfyUI (tests/test_comfyui_*.py; helpers in tests/comfyui_support.py)


@pytest.fixture(scope="session")
def comfyui_source() -> Path:
    """The installed ComfyUI tree. Missing: skipped on a developer's machine, a failure under CI."""
    import comfyui_support

    tree = comfyui_support.find_comfyui_tree()
    require_or_skip(tree is not None, "ComfyUI is not installed (`make comfyui`; see tests/comfyui-requirements.txt)")
    assert comfyui_support.comfyui_version(tree) == comfyui_support.COMFYUI_VERSION, f"{tree} is another ComfyUI"
    return tree


def _tiny_reward_model(tiny_backbone: str, prompt_aware: bool = False, seed: int = 0):
    from ganrm_diffusers.reward.model import GANRewardModel

    torch.manual_seed(seed)
    return GANRewardModel(
        backbone=tiny_backbone, pretrained=None, hidden_sizes=(32,), dropout=0.0, prompt_aware=prompt_aware
    )


@pytest.fixture(scope="session")
def comfyui_reward_models(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str) -> dict[str, Path]:
    """Tiny reward model checkpoints (backbone inside), by the name the tests give them in reward_models/."""
    root = tmp_path_factory.mktemp("comfyui_reward_models")
    folders = {"tiny": root / "tiny", "tiny-prompt-aware": root / "tiny-prompt-aware"}
    _tiny_reward_model(tiny_backbone).save_pretrained(folders["tiny"])
    _tiny_reward_model(tiny_backbone, prompt_aware=True, seed=1).save_pretrained(folders["tiny-prompt-aware"])
    return folders


COMFYUI_BACKBONE = "local-dir:reward_backbones/tiny-clip"  # a tiny CLIP inside each test tree's models folder


def prepare_comfyui_tree(source: Path, destination: Path, reward_models: dict[str, Path]) -> Path:
    """A private ComfyUI tree with the ganrm pack (and the tests' tiny-model pack) under custom_nodes/ and the given
    reward models installed."""
    import shutil

    import comfyui_support

    packs = {
        comfyui_support.PACK_NAME: comfyui_support.REPO_ROOT,
        comfyui_support.TEST_PACK_NAME: comfyui_support.TEST_PACK,
    }
    tree = comfyui_support.prepare_tree(source, destination, packs)
    for name, folder in reward_models.items():
        shutil.copytree(folder, tree / "models" / "reward_models" / name)
    # The training node reads backbones only from ComfyUI's model folders (COMFYUI_BACKBONE names this one).
    write_tiny_clip(tree / "models" / "reward_backbones" / "tiny-clip")
    return tree


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory: pytest.TempPathFactory, comfyui_source: Path, comfyui_reward_models: dict[str, Path]):
    """ComfyUI imported into the test process (once per session) with the ganrm pack loaded by its own loader."""
    import comfyui_support

    tree = prepare_comfyui_tree(
        comfyui_source, tmp_path_factory.mktemp("comfyui_inprocess") / "comfyui", comfyui_reward_models
    )
    instance = comfyui_support.InProcessComfyUI(tree).start()
    instance.pack_loaded = instance.load_pack(tree / "custom_nodes" / comfyui_support.PACK_NAME)
    instance.test_pack_loaded = instance.load_pack(tree / "custom_nodes" / comfyui_support.TEST_PACK_NAME)
    return instance


@pytest.fixture(scope="module")
def comfyui_server(
    tmp_path_factory: pytest.TempPathFactory, comfyui_source: Path, comfyui_reward_models: dict[str, Path]
):
    """`main.py --cpu` on a free loopback port with the ganrm pack; stopped after the test module."""
    import comfyui_support

    workdir = tmp_path_factory.mktemp("comfyui_server")
    tree = prepare_comfyui_tree(comfyui_source, workdir / "comfyui", comfyui_reward_models)
    with comfyui_support.running_server(tree, workdir / "server.log") as server:
        yield server


# --------------------------------------------------------------------------------------------------------------
# The embedded digits world (ganrm_diffusers.world), reduced preset: the same code as the full world, in seconds


@pytest.fixture(scope="session")
def reduced_world(tmp_path_factory: pytest.TempPathFactory):
    """A reduced world built once per session from seed 0: `world.pipeline_dir` loads with
    StableDiffusionPipeline.from_pretrained, `world.backbone` is its open_clip local-dir, `world.judges` judge
    images, `world.target_dir` / `world.heldout_target_dir` / `world.heldout_other_dir` hold real digits as PNG.
    Its generator is barely trained: use it for code paths, not for quality figures."""
    from ganrm_diffusers.world import build_world, load_world

    return load_world(build_world(tmp_path_factory.mktemp("world") / "world", seed=0, preset="reduced"))
