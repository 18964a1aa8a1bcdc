"""The one checkpoint/resume path of the trainers: safetensors for tensors, JSON for the rest, never a pickle.

A checkpoint is a folder `<output_dir>/checkpoints/checkpoint-<step>/` holding

    lora.safetensors                the trainable LoRA weights (peft's state dict of the UNet)
    optimizer.safetensors           the optimizer's per-parameter tensors (AdamW's moments and step counts)
    optimizer.json                  its param groups and non-tensor state
    scheduler.json                  the learning-rate scheduler's state
    rng-<rank>.safetensors/.json    every process's torch (CPU and CUDA), numpy and python random states
    state.json                      the trainer's counters and data position (written last)

It is written into a hidden temporary folder beside the final one and renamed into place (a rename is atomic), so
a run killed at any moment leaves only complete checkpoints behind; `latest_checkpoint` ignores the rest.
accelerate's own `save_state` pickles (torch.save), which is why the trainers do not use it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from ganrm_diffusers.generation.lora import unwrap_model
from ganrm_diffusers.utils.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (temporary folders of interrupted writes are not listed)."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [(int(match[1]), path) for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found) if (path / "state.json").is_file()]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume` names: "latest" (None if the run has none yet), or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise CheckpointError(
            f"--resume {resume}: not a checkpoint folder (no state.json); use 'latest' or a "
            f"folder under {Path(output_dir) / CHECKPOINTS_DIR}"
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Optimizer and random states as tensors + JSON


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON-able rest) of an optimizer's state dict."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict] = {}
    for flat in (tensors, rest["scalars"]):
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in rest["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and every CUDA device), numpy and python random states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, python_state, gauss_next = random.getstate()
    rest = {
        "numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": cached},
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    return tensors, rest


def set_rng_state(tensors: Mapping[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numpy = rest["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            tensors["numpy"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = rest["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights in peft's naming (what `load_lora_weights_into` puts back)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unwrap_model(model))
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def load_lora_weights_into(denoiser: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Put saved LoRA weights back into a denoiser carrying the same (freshly added) adapter, exactly."""
    from peft.utils import set_peft_model_state_dict

    model = unwrap_model(denoiser)
    expected = lora_weights(model)
    if set(expected) != set(weights) or any(expected[k].shape != weights[k].shape for k in expected):
        raise CheckpointError(
            f"the LoRA in {source} does not fit this run's LoRA (rank, alpha or target modules differ from the "
            "run that wrote it): resume with the same LoRA settings"
        )
    result = set_peft_model_state_dict(model, dict(weights))
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"the LoRA in {source} has keys this UNet lacks: {result.unexpected_keys[:3]}")


# --------------------------------------------------------------------------------------------------------------
# Writing and reading checkpoints


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    state: dict,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically (every process calls this: each writes its RNG state) and keep the
    newest `total_limit` checkpoints. `state` is the trainer's JSON-able counters and data position."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    staging = root / f".{checkpoint_name(step)}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while writing
        staging.mkdir()
    accelerator.wait_for_everyone()
    rng_tensors, rng_rest = rng_state()
    rank = accelerator.process_index
    safetensors.torch.save_file(rng_tensors, str(staging / f"rng-{rank}.safetensors"))
    _write_json(staging / f"rng-{rank}.json", rng_rest)
    if accelerator.is_main_process:
        safetensors.torch.save_file(lora_weights(denoiser), str(staging / "lora.safetensors"))
        optimizer_tensors, optimizer_rest = optimizer_state(optimizer)
        safetensors.torch.save_file(optimizer_tensors, str(staging / "optimizer.safetensors"))
        _write_json(staging / "optimizer.json", optimizer_rest)
        _write_json(staging / "scheduler.json", lr_scheduler.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(staging / "state.json", {**state, "step": step, "num_processes": accelerator.num_processes})
        _fsync_folder(staging)
        if final.exists():  # the same step written again (a resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_folder(root)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator,
    folder: str | Path,
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
) -> dict:
    """Restore what `save_checkpoint` wrote into the run's objects and random states; returns the trainer state."""
    folder = Path(folder)
    state = read_checkpoint_state(folder)
    if state.get("num_processes") != accelerator.num_processes:
        raise CheckpointError(
            f"{folder} was written by {state.get('num_processes')} processes, this run has "
            f"{accelerator.num_processes}: resume with the same number of processes (each keeps its random state)"
        )
    load_lora_weights_into(denoiser, _read_tensors(folder / "lora.safetensors"), str(folder))
    load_optimizer_state(
        optimizer, _read_tensors(folder / "optimizer.safetensors"), _read_json(folder / "optimizer.json")
    )
    lr_scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
    rank = accelerator.process_index
    set_rng_state(_read_tensors(folder / f"rng-{rank}.safetensors"), _read_json(folder / f"rng-{rank}.json"))
    return state


def read_checkpoint_state(folder: str | Path) -> dict:
    """A checkpoint's state.json: the trainer's counters, data position and config."""
    return _read_json(Path(folder) / "state.json")


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's files and entries to disk, so that a rename never exposes half-written files."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata (CheckpointError if unreadable)."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    return _read_tensors(path), metadata
