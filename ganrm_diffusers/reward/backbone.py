"""The frozen open_clip encoder under a GAN-RM head, loaded through open_clip's own factory.

A backbone is named the way open_clip names models: a built-in architecture with a pretrained tag or weights
file ("ViT-H-14" + "laion2b_s32b_b79k", "ViT-B-32" + "/path/weights.safetensors"), or a schema path
("local-dir:/path/with/open_clip_config.json", "hf-hub:org/repo"). `pretrained=None` builds random weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ganrm_diffusers.utils.atomic import write_text_atomic
from ganrm_diffusers.utils.errors import CheckpointError
from ganrm_diffusers.utils.images import pixel_batches
from ganrm_diffusers.utils.paths import cache_dir

# The user-facing default: a large CLIP, as in the paper's experiments.
DEFAULT_BACKBONE = "ViT-H-14"
DEFAULT_PRETRAINED = "laion2b_s32b_b79k"

_KEEP_WITHOUT_TEXT = ("visual", "logit_scale", "logit_bias")


def _drop_text_tower(clip: nn.Module) -> None:
    """An image-only reward never runs the text tower: free its memory (a third of ViT-H-14)."""
    for name, _ in list(clip.named_children()):
        if name not in _KEEP_WITHOUT_TEXT:
            setattr(clip, name, None)
    for name, _ in list(clip.named_parameters(recurse=False)):
        if name not in _KEEP_WITHOUT_TEXT:
            setattr(clip, name, None)
    for name, _ in list(clip.named_buffers(recurse=False)):
        setattr(clip, name, None)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickled_weights(name: str, pretrained: str | None) -> None:
    """Weights are read from files only as safetensors: the project never unpickles a user file (open_clip would
    read a .bin/.pth one with torch.load, a restricted unpickler, but an unpickler). A `local-dir:` folder must hold
    a .safetensors file (open_clip prefers it over the others); pretrained tags are open_clip's own downloads."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:") :])
        pickled = [path.name for suffix in PICKLE_SUFFIXES for path in folder.glob(f"*{suffix}")]
        if pickled and not any(folder.glob("*.safetensors")):
            raise CheckpointError(
                f"backbone folder {folder} holds weights only as pickles ({', '.join(sorted(pickled))}): only "
                "safetensors weights are read from files; convert them with safetensors.torch.save_file"
            )
        return
    if pretrained is None or ":" in name:
        return  # open_clip does not read `pretrained` for hf-hub names
    path = Path(pretrained)
    if path.suffix.lower() in PICKLE_SUFFIXES or (path.is_file() and path.suffix.lower() != ".safetensors"):
        raise CheckpointError(
            f"backbone weights {pretrained!r} are not a .safetensors file: only safetensors weights are read from "
            "files (the project never unpickles a user file); convert them with safetensors.torch.save_file"
        )


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... Model initialized randomly" and its "Local config loaded,
    but no CLIP weights found" (logged on the root logger): true of the empty model it builds, false of the
    backbone we then load our own weights into."""

    NOTICES = ("No pretrained weights loaded for model", "Local config loaded, but no CLIP weights found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


@contextmanager
def _weights_loaded_by_us() -> Iterator[None]:
    """Silence open_clip's random-initialisation notices inside the block, and only those."""
    notice = _RandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _config_dir(model_cfg: dict, preprocess_cfg: dict) -> Path:
    """A local-dir that open_clip's factory reads, for a model config stored inside a checkpoint."""
    payload = json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, sort_keys=True)
    folder = cache_dir() / "open_clip_configs" / hashlib.sha256(payload.encode()).hexdigest()[:20]
    if not (folder / "open_clip_config.json").is_file():
        write_text_atomic(folder / "open_clip_config.json", payload)
    return folder


class ClipBackbone(nn.Module):
    """A frozen open_clip model that turns pixels into L2-normalised embeddings, preprocessing on the device."""

    def __init__(
        self, clip: nn.Module, name: str, pretrained: str | None, model_cfg: dict, keep_text: bool, source: str = ""
    ):
        super().__init__()
        self.name = name
        self.source = source or name  # what open_clip's factory was given (its tokenizer is found the same way)
        self.pretrained = pretrained
        # JSON-normalised, so configs compare equal after a round trip through config.json.
        self.model_cfg = json.loads(json.dumps(model_cfg))
        self.preprocess_cfg = json.loads(json.dumps(dict(open_clip.get_model_preprocess_cfg(clip))))
        self.keep_text = keep_text
        self._tokenizer = None
        self._fingerprint: str | None = None
        if not keep_text:
            _drop_text_tower(clip)
        clip.eval().requires_grad_(False)
        self.clip = clip
        size = self.preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(self.preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.embed_dim = int(model_cfg.get("embed_dim") or self._probe_embed_dim())

    # ----------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def load(
        cls,
        name: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        *,
        keep_text: bool = False,
        device: torch.device | str | None = None,
        cache_dir: str | None = None,
    ) -> ClipBackbone:
        """Build `name` with open_clip's factory; `pretrained` is a tag, a weights file, or None for random."""
        if pretrained in ("none", ""):
            pretrained = None
        _refuse_pickled_weights(name, pretrained)
        try:
            clip = open_clip.create_model(
                name,
                pretrained=pretrained if ":" not in name else None,
                load_weights=pretrained is not None or ":" in name,
                device=device or "cpu",
                cache_dir=cache_dir,
            )
        except (RuntimeError, FileNotFoundError, ValueError, OSError) as error:
            raise CheckpointError(
                f"cannot load open_clip backbone {name!r} (pretrained={pretrained!r}): {error}"
            ) from error
        return cls(clip, name, pretrained, dict(open_clip.get_model_config(name) or {}), keep_text)

    @classmethod
    def from_state_dict(
        cls,
        name: str,
        pretrained: str | None,
        model_cfg: dict,
        preprocess_cfg: dict,
        state_dict: dict[str, torch.Tensor],
        *,
        keep_text: bool,
    ) -> ClipBackbone:
        """Rebuild a backbone saved inside a reward checkpoint (its config and weights travel with it)."""
        source = f"local-dir:{_config_dir(model_cfg, preprocess_cfg)}"
        with _weights_loaded_by_us():  # the checkpoint's weights are loaded below; a fit failure is an error
            clip = open_clip.create_model(source, load_weights=False)
        if not keep_text:
            _drop_text_tower(clip)
        missing, unexpected = clip.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"the backbone weights in the checkpoint do not fit {name!r}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        return cls(clip, name, pretrained, model_cfg, keep_text, source=source)

    # ----------------------------------------------------------------------------------------------------------
    # Identity

    @property
    def identifier(self) -> str:
        return f"{self.name} ({self.pretrained or 'random weights'})"

    def has_portable_weights(self) -> bool:
        """Whether name + tag find these weights anywhere (a known tag or a Hub repo) without copying them."""
        if self.name.startswith("hf-hub:"):
            return True
        return bool(self.pretrained) and open_clip.get_pretrained_cfg(self.name, self.pretrained) != {}

    def fingerprint(self) -> str:
        """A key for cached embeddings: name + tag for published weights, else a hash of the weights themselves."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps([self.model_cfg, self.preprocess_cfg], sort_keys=True).encode())
            if self.has_portable_weights():
                digest.update(f"{self.name}|{self.pretrained}".encode())
            else:
                for key, tensor in sorted(self.clip.visual.state_dict().items()):
                    digest.update(key.encode())
                    digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:32]
        return self._fingerprint

    def _probe_embed_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.image_size, device=self.mean.device)
            return int(self.clip.encode_image(probe).shape[-1])

    # ----------------------------------------------------------------------------------------------------------
    # Encoding

    @property
    def dtype(self) -> torch.dtype:
        return next(self.clip.visual.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """open_clip's eval transform (resize, crop, normalise) on an NCHW batch in [0, 1], on its device."""
        pixels = pixels.to(self.device, torch.float32)
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = _resize(pixels, self.image_size, self.preprocess_cfg)
        return ((pixels - self.mean) / self.std).to(self.dtype)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of an NCHW batch in [0, 1]."""
        return F.normalize(self.clip.encode_image(self.preprocess(pixels)).float(), dim=-1)

    def encode_images(
        self, images: object, *, batch_size: int = 32, value_range: tuple[float, float] = (0.0, 1.0)
    ) -> torch.Tensor:
        """Normalised embeddings of any accepted image form (see ganrm_diffusers.utils.images), in batches."""
        embeddings = []
        with torch.inference_mode():
            for batch in pixel_batches(images, device=self.device, value_range=value_range):
                for start in range(0, batch.shape[0], batch_size):
                    embeddings.append(self.encode_pixels(batch[start : start + batch_size]))
        return torch.cat(embeddings)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if not self.keep_text:
            raise RuntimeError("this backbone was loaded without its text tower (keep_text=False)")
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.source)
        with torch.inference_mode():
            tokens = self._tokenizer(list(prompts)).to(self.device)
            return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def _resize(pixels: torch.Tensor, size: tuple[int, int], cfg: dict) -> torch.Tensor:
    """Resize as open_clip's eval transform does: shortest side + centre crop, squash, or longest side + pad."""
    mode = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    height, width = pixels.shape[-2:]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode == "squash":
        target = size
    else:
        pick = min if resize_mode == "longest" else max  # "shortest": the short side reaches the target
        scale = pick(size[0] / height, size[1] / width)
        target = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = F.interpolate(pixels, size=target, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    return _center_crop_or_pad(resized, size, fill=cfg.get("fill_color", 0) / 255.0)


def _center_crop_or_pad(pixels: torch.Tensor, size: tuple[int, int], fill: float) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    if pad_h or pad_w:
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
        height, width = pixels.shape[-2:]
    top = int(round((height - size[0]) / 2.0))
    left = int(round((width - size[1]) / 2.0))
    return pixels[..., top : top + size[0], left : left + size[1]]
