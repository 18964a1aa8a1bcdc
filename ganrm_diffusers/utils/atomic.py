"""Atomic file writes: every file ganrm writes appears whole or not at all.

A file is written to a temporary name in its own folder (same file system, so the rename is atomic) and renamed
over the target only once complete; an error or interruption leaves the old file, never half a new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import PIL.Image
import safetensors.torch
import torch


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; write there, and on a clean exit it replaces `path`.

    `suffix` matters to writers that pick a format by extension (PIL: use ".png")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: object, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")


def save_png_atomic(image: PIL.Image.Image, path: str | Path) -> None:
    with atomic_path(path, suffix=".png") as temporary:
        image.save(temporary, format="PNG")


def save_tensors_atomic(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A safetensors file (tensors moved to the CPU and made contiguous first)."""
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(tensors, temporary, metadata=metadata)
