"""The UI-format workflows in the real ComfyUI front end (the comfyui-frontend-package the server serves), in
headless Chromium: they load without errors or missing nodes, read back as exactly their API-format twins, and a
screenshot of each is kept (out/test-artifacts/comfyui/, or $GANRM_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import comfyui_support
import pytest
from checks import require_or_skip

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted(
    path.name.removesuffix(".api.json") for path in (comfyui_support.REPO_ROOT / "workflows").glob("*.api.json")
)
ARTIFACTS = (
    Path(os.environ.get("GANRM_TEST_ARTIFACTS", comfyui_support.REPO_ROOT / "out" / "test-artifacts")) / "comfyui"
)


@pytest.fixture(scope="module")
def front_end(comfyui_server):
    chromium = Path(comfyui_support.CHROMIUM)
    require_or_skip(chromium.exists(), f"no Chromium at {chromium} (apt-get install chromium)")
    with comfyui_support.FrontEnd(comfyui_server) as page:
        yield page


def test_there_are_six_workflows_in_both_formats():
    assert WORKFLOWS == [
        "flux_best_of_n_sampler",
        "sd15_best_of_n",
        "sd15_best_of_n_sampler",
        "sd15_lora_best_of_n",
        "sdxl_best_of_n_sampler",
        "train_reward_model",
    ]
    for name in WORKFLOWS:
        assert (comfyui_support.REPO_ROOT / "workflows" / f"{name}.json").is_file()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_loads_cleanly_and_matches_its_api_format(front_end, comfyui_server, name):
    folder = comfyui_support.REPO_ROOT / "workflows"
    api_graph = json.loads((folder / f"{name}.api.json").read_text())
    comfyui_support.placeholder_models(comfyui_server.tree, api_graph)  # so every combo value exists

    problems = front_end.load_workflow(json.loads((folder / f"{name}.json").read_text()))
    screenshot = front_end.screenshot(ARTIFACTS / f"{name}.png")
    assert problems == [], f"{name} does not load cleanly (see {screenshot}): {problems}"
    assert comfyui_support.comparable_api_graph(front_end.api_graph()) == comfyui_support.comparable_api_graph(
        api_graph
    )
    assert screenshot.stat().st_size > 10_000


def test_the_check_catches_a_workflow_with_an_unknown_node(front_end):
    """The same check must fail for a workflow the front end cannot load, or passing it would prove nothing."""
    workflow = json.loads((comfyui_support.REPO_ROOT / "workflows" / "sd15_best_of_n.json").read_text())
    workflow["nodes"][0]["type"] = "NoSuchNodeAnywhere"
    problems = front_end.load_workflow(workflow)
    assert any("NoSuchNodeAnywhere" in problem for problem in problems), problems
