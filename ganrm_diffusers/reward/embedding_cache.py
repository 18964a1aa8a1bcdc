"""Image embeddings cached on disk, keyed by backbone fingerprint and file content hash.

Retraining a head on cached embeddings takes seconds; the frozen encoder runs once per image and backbone.
Each entry is a small safetensors file written atomically, so concurrent runs never see half an entry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ganrm_diffusers.reward.backbone import ClipBackbone
from ganrm_diffusers.utils.atomic import save_tensors_atomic
from ganrm_diffusers.utils.errors import ImageInputError
from ganrm_diffusers.utils.images import file_digest, list_image_files, load_image, read_file_prompts
from ganrm_diffusers.utils.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedFiles:
    """Embeddings of the readable files of a folder (or file list), in file order, with each file's prompt from the
    nearest imagefolder metadata.jsonl (None for a file without one; `prompts` None when no file has one)."""

    paths: list[Path]
    embeddings: torch.Tensor
    prompts: list[str | None] | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class EmbeddingCache:
    """Per-backbone store of image embeddings under `root` (default: <ganrm cache>/embeddings)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"

    def _entry(self, encoder: ClipBackbone, digest: str) -> Path:
        return self.root / encoder.fingerprint() / digest[:2] / f"{digest}.safetensors"

    def get(self, encoder: ClipBackbone, digest: str) -> torch.Tensor | None:
        entry = self._entry(encoder, digest)
        if not entry.is_file():
            return None
        try:
            return load_file(entry)["embedding"]
        except (SafetensorError, OSError, KeyError):
            logger.warning("ignoring unreadable cache entry %s", entry)
            return None

    def put(self, encoder: ClipBackbone, digest: str, embedding: torch.Tensor) -> None:
        entry = self._entry(encoder, digest)
        save_tensors_atomic(entry, {"embedding": embedding.float()})


def embed_files(
    encoder: ClipBackbone,
    files: str | Path | Sequence[str | Path],
    *,
    cache: EmbeddingCache | None = None,
    strict: bool = False,
    min_images: int = 1,
    batch_size: int = 32,
    description: str = "embedding images",
) -> EmbeddedFiles:
    """Embed a folder (recursively) or a list of image files, reusing cached embeddings.

    Unreadable files are named in a warning and skipped, or raise ImageInputError when `strict`.
    Fewer than `min_images` readable images is an error naming the folder.
    """
    folder = Path(files) if isinstance(files, (str, Path)) else None
    paths = list_image_files(folder) if folder is not None else [Path(path) for path in files]
    cache = cache or EmbeddingCache()
    digests = [file_digest(path) for path in paths]
    embeddings: dict[int, torch.Tensor] = {}
    for index, digest in enumerate(digests):
        cached = cache.get(encoder, digest)
        if cached is not None:
            embeddings[index] = cached

    skipped: list[tuple[Path, str]] = []
    missing = [index for index in range(len(paths)) if index not in embeddings]
    progress = tqdm(total=len(missing), desc=description, unit="img", disable=not missing, leave=False)
    for start in range(0, len(missing), batch_size):
        batch_indices, images = [], []
        for index in missing[start : start + batch_size]:
            try:
                images.append(load_image(paths[index]))
                batch_indices.append(index)
            except ImageInputError as error:
                if strict:
                    raise
                logger.warning("skipping %s", error)
                skipped.append((paths[index], str(error)))
        if images:
            for index, embedding in zip(
                batch_indices, encoder.encode_images(images, batch_size=batch_size), strict=True
            ):
                embeddings[index] = embedding.cpu()
                cache.put(encoder, digests[index], embedding)
        progress.update(len(missing[start : start + batch_size]))
    progress.close()

    kept = sorted(embeddings)
    where = f"image folder {folder}" if folder is not None else "the image list"
    if len(kept) < min_images:
        raise ImageInputError(
            f"{where} has {len(kept)} readable image(s); at least {min_images} are needed"
            + (f" ({len(skipped)} unreadable file(s) skipped)" if skipped else "")
        )
    kept_paths = [paths[index] for index in kept]
    prompts = read_file_prompts(kept_paths, root=folder)
    return EmbeddedFiles(
        paths=kept_paths,
        embeddings=torch.stack([embeddings[index] for index in kept]).to(encoder.device),
        prompts=prompts,
        skipped=skipped,
    )
