"""Reward models inside ComfyUI: where they are found, and ComfyUI's model management around them.

Checkpoints are folders (config.json + model.safetensors, see ganrm_diffusers.reward.model) under the
`reward_models` model folder, which extra_model_paths.yaml can extend like any other, or Hub ids already in the
local Hugging Face cache (nothing is ever downloaded from a node).
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as model_management
import comfy.model_patcher
import folder_paths
import torch

from ganrm_diffusers.reward.hub_cache import cached_reward_model_ids
from ganrm_diffusers.reward.model import CONFIG_NAME, GANRewardModel
from ganrm_diffusers.utils.errors import CheckpointError, GanrmError

FOLDER_NAME = "reward_models"
HUB_PREFIX = "hub:"  # combo entries naming a Hub id from the local cache, e.g. "hub:you/ganrm-my-style"
LOCAL_DIR = "local-dir:"  # open_clip's prefix for a backbone config folder
# The server owner's opt-in to paths outside ComfyUI's own folders (a server nobody else can reach).
ALLOW_ANY_PATH_ENV = "GANRM_COMFYUI_ALLOW_ANY_PATH"


class PathNotAllowedError(GanrmError, PermissionError):
    """A node input names a path outside the folders the server lets prompts read."""


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes")


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root.resolve()) for root in roots)


def _refuse(what: str, text: str, where: str) -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{what} {text!r} is outside {where}: a prompt may only read ComfyUI's own folders. Put it there, or, "
        f"on a server nobody else can reach, its owner may set {ALLOW_ANY_PATH_ENV}=1"
    )


def target_folder(text: str) -> Path:
    """A folder of target images: relative to ComfyUI's input directory, and (absolute or not) inside it."""
    input_dir = Path(folder_paths.get_input_directory())
    path = Path(text).expanduser()
    # Resolved once, and the resolved path is what gets read: symlinks and ".." cannot lead out afterwards.
    path = (path if path.is_absolute() else input_dir / path).resolve()
    if not any_path_allowed() and not _inside(path, [input_dir]):
        raise _refuse("positives_folder", text, f"ComfyUI's input folder ({input_dir})")
    return path


# Model folders a backbone may come from (with their extra_model_paths.yaml entries); not every registered folder
# (custom_nodes is one).
BACKBONE_FOLDERS = ("reward_models", "clip", "clip_vision", "text_encoders", "checkpoints")


def _model_roots() -> list[Path]:
    roots = {Path(folder_paths.models_dir)}
    for name in BACKBONE_FOLDERS:
        if name in folder_paths.folder_names_and_paths:
            roots.update(Path(path) for path in folder_paths.get_folder_paths(name))
    return sorted(roots)


def _model_file(text: str, what: str) -> str:
    path = Path(text).expanduser()
    path = (path if path.is_absolute() else Path(folder_paths.models_dir) / path).resolve()
    if not any_path_allowed() and not _inside(path, _model_roots()):
        raise _refuse(what, text, f"ComfyUI's model folders ({folder_paths.models_dir} and the extra model paths)")
    return str(path)


def backbone_arguments(backbone: str, pretrained: str) -> tuple[str, str | None]:
    """The training node's backbone and weights, read only from ComfyUI's model folders: `local-dir:<folder>`
    and weights files relative to ComfyUI/models (or absolute inside a model folder). open_clip names, hf-hub ids
    and pretrained tags are not paths and pass unchanged."""
    backbone, pretrained = backbone.strip(), pretrained.strip()
    if backbone.startswith(LOCAL_DIR):
        backbone = LOCAL_DIR + _model_file(backbone[len(LOCAL_DIR) :], "backbone folder")
    if ":" not in backbone and _names_a_file(pretrained):  # open_clip reads `pretrained` only for plain names
        pretrained = _model_file(pretrained, "pretrained weights file")
    return backbone, pretrained or None


def _names_a_file(pretrained: str) -> bool:
    return "/" in pretrained or os.sep in pretrained or Path(pretrained).suffix.lower() in WEIGHT_SUFFIXES


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def register_model_folder() -> None:
    """Add ComfyUI/models/reward_models (kept after any paths extra_model_paths.yaml already gave)."""
    folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME))


def save_folder(name: str) -> Path:
    """Where a reward model trained in ComfyUI under `name` is written: the first reward_models folder."""
    if not name or name != Path(name).name or name.startswith("."):
        raise GanrmError(f"reward model name {name!r} must be a plain folder name (no slashes, not hidden)")
    return Path(folder_paths.get_folder_paths(FOLDER_NAME)[0]) / name


def local_model_names() -> list[str]:
    """Checkpoint folders under every reward_models path, relative to it (e.g. "portraits", "styles/ink")."""
    names = {
        Path(entry).parent.as_posix()
        for entry in folder_paths.get_filename_list(FOLDER_NAME)
        if Path(entry).name == CONFIG_NAME and Path(entry).parent != Path(".")
    }
    return sorted(names)


def available_models() -> list[str]:
    """The Loader's choices: local checkpoint folders, then cached Hub ids (prefixed with "hub:")."""
    return local_model_names() + [HUB_PREFIX + repo_id for repo_id in cached_reward_model_ids()]


def resolve(name: str) -> str:
    """The folder path or Hub id that GANRewardModel.from_pretrained takes for a Loader choice."""
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX) :]
    config = folder_paths.get_full_path(FOLDER_NAME, f"{name}/{CONFIG_NAME}")
    if config is None:
        searched = ", ".join(folder_paths.get_folder_paths(FOLDER_NAME))
        raise CheckpointError(f"reward model {name!r} not found in the reward_models folders ({searched})")
    return str(Path(config).parent)


def checkpoint_stamp(name: str) -> str:
    """Changes whenever the checkpoint's files change, so ComfyUI reloads a model retrained under the same name."""
    try:
        folder = Path(resolve(name))
    except GanrmError:
        return name  # loading will report the problem
    if not folder.is_dir():
        return name
    return ";".join(
        f"{path.name}:{path.stat().st_mtime_ns}:{path.stat().st_size}"
        for path in sorted(folder.iterdir())
        if path.is_file()
    )


class _ManagedModule(torch.nn.Module):
    """What ModelPatcher manages: it sets `.device` on its module, which diffusers models keep read-only."""

    def __init__(self, reward_model: GANRewardModel):
        super().__init__()
        self.reward_model = reward_model


class RewardModelHandle:
    """The value a GANRM_REWARD_MODEL socket carries: a reward model under ComfyUI's model management.

    It waits on the offload device (the CPU) and is loaded onto ComfyUI's torch device only to score, through
    model_management, which frees other models first if memory is tight and offloads this one when others need room.
    Weights are half precision where ComfyUI says the device runs fp16 well.
    """

    def __init__(self, model: GANRewardModel, name: str):
        self.name = name
        self.load_device = model_management.get_torch_device()
        self.offload_device = model_management.unet_offload_device()
        self.dtype = torch.float16 if model_management.should_use_fp16(self.load_device) else torch.float32
        model = model.to(self.offload_device)
        if model.dtype != self.dtype:  # diffusers warns about every dtype cast, even a no-op one
            model = model.to(dtype=self.dtype)
        self.model = model.eval()
        self.patcher = comfy.model_patcher.ModelPatcher(
            _ManagedModule(self.model), load_device=self.load_device, offload_device=self.offload_device
        )

    @property
    def prompt_aware(self) -> bool:
        return bool(self.model.config.prompt_aware)

    def score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """One logit per image of a ComfyUI IMAGE batch ([B, H, W, C] floats in 0..1), float32 on the CPU."""
        # Our modules are plain torch layers, not ComfyUI's castable ones: they must be loaded whole.
        model_management.load_models_gpu([self.patcher], force_full_load=True)
        # NHWC is certain for ComfyUI IMAGE; passing NCHW spares the library from guessing the layout.
        pixels = images.movedim(-1, 1).to(self.load_device)
        return self.model.score(pixels, prompts).float().cpu()


def load(name: str) -> RewardModelHandle:
    """Load a Loader choice (local folder or cached Hub id) without touching the network."""
    model = GANRewardModel.from_pretrained(resolve(name), local_files_only=True)
    return RewardModelHandle(model, name)
