"""Reading images from disk and turning every accepted image form into one pixel tensor convention.

Convention inside ganrm: float tensors, NCHW, RGB, values in [0, 1], on the device where they will be used.
Accepted inputs: PIL images, numpy arrays, uint8 or float tensors in NCHW or NHWC (ComfyUI hands over NHWC
floats in [0, 1], diffusers NCHW floats), single images or batches, or lists of any of these.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ganrm_diffusers.utils.errors import ImageInputError

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"  # a Hugging Face imagefolder's per-file records

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Transparent pixels are shown over white, as image viewers and web pages usually show them.
TRANSPARENT_BACKGROUND = 255

# --------------------------------------------------------------------------------------------------------------
# Files


def list_image_files(folder: str | Path) -> list[Path]:
    """All image files under `folder` (recursively, sorted), ignoring hidden and non-image files."""
    folder = Path(folder)
    if not folder.exists():
        raise ImageInputError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ImageInputError(f"{folder} is not a folder")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise ImageInputError(f"image folder {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and return it as 8-bit RGB; raises ImageInputError for unreadable files."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so truncated files fail here rather than later
            image = ImageOps.exif_transpose(opened)
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"cannot read image {path}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit and float grayscale are rescaled, alpha is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image)
        if array.dtype == np.float32 or array.dtype == np.float64:
            scale = 1.0 if array.max(initial=0.0) <= 1.0 else 1.0 / 255.0
            array8 = np.clip(array * scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            # 16-bit data: 65535 is white. PIL's own convert("L") clips instead of rescaling.
            array8 = np.clip(array.astype(np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array8, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (TRANSPARENT_BACKGROUND,) * 3 + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the key of cached embeddings (renaming a file keeps its cache entry)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ImageFolder:
    """The readable images of a folder, with the prompt of each (from metadata.jsonl, if there is one)."""

    folder: Path
    paths: list[Path]
    images: list[Image.Image]
    prompts: list[str] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def load_image_folder(folder: str | Path, *, strict: bool = False, min_images: int = 1) -> ImageFolder:
    """Read every image of a folder. Unreadable files are named in a warning and skipped (an error if `strict`)."""
    folder = Path(folder)
    paths, images, skipped = [], [], []
    for path in list_image_files(folder):
        try:
            images.append(load_image(path))
            paths.append(path)
        except ImageInputError as error:
            if strict:
                raise
            logger.warning("skipping %s", error)
            skipped.append((path, str(error)))
    if len(paths) < min_images:
        raise ImageInputError(
            f"image folder {folder} has {len(paths)} readable image(s); at least {min_images} are needed"
            + (f" ({len(skipped)} unreadable file(s) skipped)" if skipped else "")
        )
    return ImageFolder(
        folder=folder, paths=paths, images=images, prompts=read_file_prompts(paths, root=folder), skipped=skipped
    )


def read_file_prompts(paths: Sequence[Path], root: Path | None = None) -> list[str | None] | None:
    """The prompt of each file from the nearest `metadata.jsonl` above it (its folder, then the folders above, up
    to `root` if given), as an imagefolder dataset records them; None for a file that no metadata names, and None
    instead of a list when no file has one: a missing prompt stays visibly missing, never an empty string."""
    root = Path(root).absolute() if root is not None else None
    maps: dict[Path, dict[str, str]] = {}
    prompts: list[str | None] = []
    for path in paths:
        path = Path(path).absolute()
        prompt = None
        for folder in path.parents:
            if folder not in maps:
                maps[folder] = _prompt_map(folder / METADATA_NAME) if (folder / METADATA_NAME).is_file() else {}
            if maps[folder] or folder == root:
                prompt = maps[folder].get(path.relative_to(folder).as_posix())
                break
        prompts.append(prompt)
    return prompts if any(prompt is not None for prompt in prompts) else None


def _prompt_map(metadata: Path) -> dict[str, str]:
    """file_name -> prompt (or text) of an imagefolder metadata.jsonl; empty when there is none."""
    if not metadata.is_file():
        return {}
    by_file: dict[str, str] = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ImageInputError(f"{metadata} line {number} is not valid JSON: {error}") from error
        prompt = record.get("prompt", record.get("text"))
        if "file_name" in record and prompt is not None:
            by_file[str(record["file_name"])] = str(prompt)
    return by_file


# --------------------------------------------------------------------------------------------------------------
# Tensors


def _as_tensor(item: object) -> torch.Tensor:
    if isinstance(item, Image.Image):
        return torch.from_numpy(np.array(to_rgb(item))).permute(2, 0, 1)
    if isinstance(item, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(item))
    if isinstance(item, torch.Tensor):
        return item
    raise ImageInputError(f"cannot use {type(item).__name__} as an image (expected PIL, numpy or torch)")


def _as_batch(item: object) -> torch.Tensor:
    """A 4-D tensor from one image (HW, CHW, HWC) or a batch (NCHW, NHWC)."""
    tensor = _as_tensor(item)
    if tensor.ndim == 2:
        return tensor[None, None]
    if tensor.ndim == 3:
        return tensor[None]
    if tensor.ndim == 4:
        return tensor
    raise ImageInputError(f"image tensor has {tensor.ndim} dimensions; expected HW, CHW/HWC or NCHW/NHWC")


def _channels_first(batch: torch.Tensor) -> torch.Tensor:
    """NCHW from NCHW or NHWC. Channel counts 1, 3 and 4 are recognised; NCHW wins when both could be."""
    channels_first = batch.shape[1] in (1, 2, 3, 4)
    channels_last = batch.shape[-1] in (1, 2, 3, 4)
    if channels_last and not channels_first:
        return batch.permute(0, 3, 1, 2)
    if channels_first:
        return batch
    raise ImageInputError(
        f"image tensor of shape {tuple(batch.shape)} has no channel axis of size 1, 3 or 4 (expected NCHW or NHWC)"
    )


def _to_unit_float(batch: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    if batch.dtype == torch.uint16:
        return batch.float() / 65535.0
    if batch.dtype == torch.bool or not torch.is_floating_point(batch):
        raise ImageInputError(f"image tensors must be uint8 or floating point, got {batch.dtype}")
    if not torch.isfinite(batch).all():
        bad = (~torch.isfinite(batch)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ImageInputError(f"image tensor holds NaN or infinite values (image(s) {bad[:10]})")
    low, high = value_range
    batch = (batch.float() - low) / (high - low)
    # Decoders overshoot a little; anything further out is a caller using another value range.
    tolerance = 1e-2
    if batch.min() < -tolerance or batch.max() > 1 + tolerance:
        raise ImageInputError(
            f"float images must be in [{low}, {high}], got values in "
            f"[{batch.min().item() * (high - low) + low:.3g}, {batch.max().item() * (high - low) + low:.3g}]"
            " (pass value_range=(-1, 1) for images in [-1, 1])"
        )
    return batch.clamp(0.0, 1.0)


def _to_rgb_channels(batch: torch.Tensor) -> torch.Tensor:
    channels = batch.shape[1]
    if channels in (2, 4):  # gray+alpha or RGBA: composite over white, as for files
        color, alpha = batch[:, :-1], batch[:, -1:]
        batch = color * alpha + (TRANSPARENT_BACKGROUND / 255.0) * (1 - alpha)
        channels -= 1
    if channels == 1:
        batch = batch.expand(-1, 3, -1, -1)
    return batch


def pixel_batches(
    images: object,
    *,
    device: torch.device | str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Iterable[torch.Tensor]:
    """Yield NCHW RGB float batches in [0, 1] on `device`; each yielded batch holds images of one size.

    A 4-D tensor is one batch (no copy when it already has the convention); a list is split into runs of equal
    size. `value_range` says how float inputs are scaled (uint8 is always 0..255).
    """
    if isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        items = [_as_batch(images)]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ImageInputError("no images given (an empty batch)")
        items = [_as_batch(item) for item in images]
    else:
        raise ImageInputError(f"cannot use {type(images).__name__} as images")

    run: list[torch.Tensor] = []
    for item in items:
        if item.shape[0] == 0:
            raise ImageInputError("no images given (an empty batch)")
        batch = _to_rgb_channels(_to_unit_float(_channels_first(item.to(device)), value_range))
        if run and batch.shape[-2:] != run[0].shape[-2:]:
            yield torch.cat(run) if len(run) > 1 else run[0]
            run = []
        run.append(batch)
    if run:
        yield torch.cat(run) if len(run) > 1 else run[0]


def to_pixels(images: object, **kwargs: object) -> torch.Tensor:
    """One NCHW float batch in [0, 1]; all images must have the same size."""
    batches = list(pixel_batches(images, **kwargs))
    if len(batches) > 1:
        raise ImageInputError("images of different sizes cannot form one batch")
    return batches[0]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """PIL images from an NCHW batch in [0, 1]."""
    array = (pixels.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(item) for item in array]
