"""GANRewardModel: a frozen open_clip image encoder and a small MLP head, trained as a discriminator.

The reward of an image is the head's logit (higher = more like the target set); `probability` is its sigmoid.
A checkpoint is a folder: `config.json` (backbone, head shape, preprocessing, training summary), `model.safetensors`
(the head, and the backbone too when its weights cannot be found by name), and a model card `README.md`.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ganrm_diffusers.reward.backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, ClipBackbone
from ganrm_diffusers.reward.card import make_model_card
from ganrm_diffusers.utils.atomic import atomic_path, save_tensors_atomic, write_text_atomic
from ganrm_diffusers.utils.errors import CheckpointError, ImageInputError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


class RewardHead(nn.Module):
    """The trainable part: an MLP from (image[, prompt]) features to one logit."""

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class GANRewardModel(ModelMixin, ConfigMixin):
    """GAN-RM reward model (arXiv 2506.13846): frozen CLIP image encoder + MLP discriminator head.

    Build a fresh (untrained) model with `GANRewardModel(backbone="ViT-H-14", pretrained="laion2b_s32b_b79k")`,
    train it with `ganrm_diffusers.reward.training.fit_reward_model`, and score images with `score(images)`.
    """

    config_name = CONFIG_NAME
    ignore_for_config = ["clip_backbone"]

    @register_to_config
    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str | None = DEFAULT_PRETRAINED,
        hidden_sizes: Sequence[int] = (512, 128),
        dropout: float = 0.1,
        prompt_aware: bool = False,
        embed_dim: int | None = None,
        preprocess: dict | None = None,
        backbone_config: dict | None = None,
        backbone_in_checkpoint: bool = False,
        training: dict | None = None,
        clip_backbone: ClipBackbone | None = None,
    ):
        super().__init__()
        if clip_backbone is None:
            clip_backbone = ClipBackbone.load(backbone, pretrained, keep_text=prompt_aware)
        if prompt_aware and not clip_backbone.keep_text:
            raise CheckpointError("a prompt-aware reward model needs a backbone loaded with its text tower")
        if embed_dim is not None and embed_dim != clip_backbone.embed_dim:
            raise CheckpointError(
                f"reward head made for embeddings of size {embed_dim} from {backbone!r}, but backbone "
                f"{clip_backbone.identifier} gives embeddings of size {clip_backbone.embed_dim}"
            )
        self.encoder = clip_backbone
        self.head = RewardHead(clip_backbone.embed_dim * (3 if prompt_aware else 1), hidden_sizes, dropout)
        self.register_to_config(
            pretrained=clip_backbone.pretrained,  # "none" means None: random weights
            embed_dim=clip_backbone.embed_dim,
            preprocess=clip_backbone.preprocess_cfg,
            backbone_config=clip_backbone.model_cfg,
        )
        self.eval()

    # ----------------------------------------------------------------------------------------------------------
    # Scoring

    def head_features(
        self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Head input. Unit-norm embeddings are scaled by sqrt(dim) so each feature has about unit variance."""
        scale = math.sqrt(self.config.embed_dim)
        image = image_embeddings.to(self.head.net[0].weight.dtype) * scale
        if not self.config.prompt_aware:
            return image
        if text_embeddings is None:
            raise ImageInputError("this reward model is prompt-aware: pass the prompt of every image")
        text = text_embeddings.to(image.dtype) * scale
        return torch.cat([image, text, image * text], dim=-1)

    def score_embeddings(
        self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for precomputed (normalised) embeddings; differentiable through the head."""
        return self.head(self.head_features(image_embeddings, text_embeddings)).float()

    def embed_prompts(self, prompts: str | Sequence[str] | None, count: int) -> torch.Tensor | None:
        """Text embeddings for `count` images (one prompt for all, or one each); None for image-only models."""
        if not self.config.prompt_aware:
            return None
        if prompts is None:
            raise ImageInputError("this reward model is prompt-aware: pass the prompt of every image")
        prompts = [prompts] * count if isinstance(prompts, str) else list(prompts)
        if len(prompts) != count:
            raise ImageInputError(f"got {len(prompts)} prompts for {count} images")
        missing = [index for index, prompt in enumerate(prompts) if prompt is None]
        if missing:
            raise ImageInputError(
                f"this reward model is prompt-aware, but {len(missing)} of {count} images have no prompt (images "
                f"{missing[:10]}): give each its prompt (a metadata.jsonl line with file_name and prompt beside files)"
            )
        return self.encoder.encode_text(prompts)

    def copy(self) -> GANRewardModel:
        """A model with its own copy of the head and the same (frozen, shared) backbone: what an adversarial loop
        trains further while the original keeps scoring."""
        config = {key: value for key, value in self.config.items() if not key.startswith("_")}
        clone = type(self)(**config, clip_backbone=self.encoder)
        clone.head.load_state_dict(self.head.state_dict())
        return clone.to(self.device).eval()

    @torch.inference_mode()
    def score(
        self,
        images: object,
        prompts: str | Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> torch.Tensor:
        """Rewards (logits, float32, on the model's device) for PIL images, arrays or tensors (NCHW or NHWC).

        Tensors stay on their device and are preprocessed there in batches. Float images are read in
        `value_range` ((0, 1) for ComfyUI IMAGE and diffusers "pt" output; pass (-1, 1) for raw VAE output).
        `prompts` is used by prompt-aware models only: one string for all images or one per image.
        """
        embeddings = self.encoder.encode_images(images, batch_size=batch_size, value_range=value_range)
        return self.score_embeddings(embeddings, self.embed_prompts(prompts, embeddings.shape[0]))

    def probability(self, images: object, prompts: str | Sequence[str] | None = None, **kwargs: object) -> torch.Tensor:
        """The discriminator's confidence that each image comes from the target set: sigmoid(score)."""
        return torch.sigmoid(self.score(images, prompts, **kwargs))

    def forward(self, pixels: torch.Tensor, text_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for an NCHW batch in [0, 1] (the backbone stays frozen; the head gets gradients)."""
        with torch.no_grad():
            embeddings = self.encoder.encode_pixels(pixels)
        return self.score_embeddings(embeddings, text_embeddings)

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        save_backbone: bool | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **kwargs: object,
    ) -> None:
        """Write config.json, model.safetensors and README.md, each atomically (weights before config).

        `save_backbone=None` stores the backbone only when its weights cannot be found again by name
        (random weights, a local file or folder); a published tag or Hub repo is stored by name alone.
        Other keyword arguments from diffusers' pipeline saving (safe_serialization, variant, ...) are accepted.
        """
        if save_backbone is None:
            save_backbone = not self.encoder.has_portable_weights()
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"head.{key}": value for key, value in self.head.state_dict().items()}
        if save_backbone:
            tensors.update({f"backbone.{key}": value for key, value in self.encoder.clip.state_dict().items()})
        tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        self.register_to_config(backbone_in_checkpoint=bool(save_backbone))

        save_tensors_atomic(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_text_atomic(folder / CONFIG_NAME, self.to_json_string())
        with atomic_path(folder / CARD_NAME) as temporary:
            make_model_card(self.config).save(temporary)
        if push_to_hub:
            self.push_to_hub(repo_id or folder.name)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        backbone: str | ClipBackbone | None = None,
        backbone_pretrained: str | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: object,
    ) -> GANRewardModel:
        """Load a checkpoint from a local folder or a Hub repo id (honours HF_HUB_OFFLINE and the Hub cache).

        `backbone` may give an already loaded ClipBackbone (or another open_clip name) to use instead of the
        one recorded in the checkpoint; it must be the same backbone, or loading fails naming both.
        `backbone_pretrained` points the recorded architecture at other weights for it (e.g. a local file).
        Keyword arguments that diffusers' pipeline loading passes (low_cpu_mem_usage, variant, ...) are ignored.
        """
        folder = resolve_checkpoint_folder(
            pretrained_model_name_or_path, subfolder, revision, cache_dir, local_files_only, token
        )
        config = _read_config(folder, cls)
        weights = _read_weights(folder / WEIGHTS_NAME)
        clip_backbone = _checkpoint_backbone(config, weights, backbone, backbone_pretrained)
        init_keys = set(cls._get_init_keys(cls)) - {"self", "clip_backbone"}
        model = cls(**{key: value for key, value in config.items() if key in init_keys}, clip_backbone=clip_backbone)
        head_state = {key[len("head.") :]: value for key, value in weights.items() if key.startswith("head.")}
        try:
            model.head.load_state_dict(head_state)
        except RuntimeError as error:
            raise CheckpointError(
                f"the head weights in {folder / WEIGHTS_NAME} do not fit its config: {error}"
            ) from error
        model.register_to_config(backbone_in_checkpoint=config.get("backbone_in_checkpoint", False))
        if device is not None or torch_dtype is not None:
            model.to(device=device, dtype=torch_dtype)
        return model.eval()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload GAN-RM reward model",
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
        save_backbone: bool | None = None,
        **kwargs: object,
    ) -> str:
        """Create the repo if needed and upload exactly the files `save_pretrained` writes; returns the commit URL."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, save_backbone=save_backbone)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                create_pr=create_pr,
                revision=revision,
            )
        return str(getattr(commit, "commit_url", commit))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint helpers


def resolve_checkpoint_folder(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local folder as it is, or a Hub repo id through the Hub cache (offline when HF_HUB_OFFLINE=1)."""
    local = Path(name_or_path) / (subfolder or "")
    if local.is_dir():
        return local
    if Path(name_or_path).exists() or os.path.isabs(str(name_or_path)) or str(name_or_path).startswith("."):
        raise CheckpointError(f"reward model folder {local} does not exist")
    patterns = [f"{subfolder}/*" if subfolder else "*"]
    try:
        snapshot = snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
            allow_patterns=patterns,
        )
    except LocalEntryNotFoundError as error:
        raise CheckpointError(
            f"reward model {name_or_path!r} is neither a local folder nor in the Hugging Face cache "
            "(offline, or the Hub could not be reached)"
        ) from error
    except (HfHubHTTPError, ValueError) as error:
        raise CheckpointError(f"cannot fetch reward model {name_or_path!r} from the Hub: {error}") from error
    return Path(snapshot) / (subfolder or "")


def _read_config(folder: Path, cls: type[GANRewardModel]) -> dict:
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{folder} is not a reward model checkpoint: it has no {CONFIG_NAME}")
    try:
        config = dict(cls.load_config(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {folder / CONFIG_NAME}: {error}") from error
    if config.get("_class_name") != cls.__name__:
        raise CheckpointError(
            f"{folder} holds a {config.get('_class_name') or 'non-diffusers'} checkpoint, not a {cls.__name__}"
        )
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"reward model weights {path} are missing")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"reward model weights {path} are not a readable safetensors file: {error}") from error
    bad = [key for key, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"reward model weights {path} hold NaN or infinite values (in {bad[:3]})")
    return weights


def _checkpoint_backbone(
    config: dict,
    weights: dict[str, torch.Tensor],
    override: str | ClipBackbone | None,
    override_pretrained: str | None,
) -> ClipBackbone:
    """The backbone a checkpoint was trained on, checked against any backbone the caller supplies."""
    recorded = f"{config['backbone']} ({config.get('pretrained') or 'random weights'}, embed dim {config['embed_dim']})"
    if isinstance(override, str) and override != config["backbone"]:
        raise CheckpointError(f"this reward model was trained on backbone {recorded}, not on {override!r}")
    if isinstance(override, ClipBackbone):
        clip_backbone = override
    elif config.get("backbone_in_checkpoint") and override_pretrained is None:
        state = {key[len("backbone.") :]: value for key, value in weights.items() if key.startswith("backbone.")}
        if not state:
            raise CheckpointError("the checkpoint's config says it holds its backbone, but its weights have none")
        clip_backbone = ClipBackbone.from_state_dict(
            config["backbone"],
            config.get("pretrained"),
            config["backbone_config"],
            config["preprocess"],
            state,
            keep_text=config["prompt_aware"],
        )
    else:
        pretrained = override_pretrained if override_pretrained is not None else config.get("pretrained")
        clip_backbone = ClipBackbone.load(config["backbone"], pretrained, keep_text=config["prompt_aware"])
    same_name = clip_backbone.name == config["backbone"]
    same_architecture = not config.get("backbone_config") or clip_backbone.model_cfg in ({}, config["backbone_config"])
    if not (same_name and same_architecture and clip_backbone.embed_dim == config["embed_dim"]):
        raise CheckpointError(
            f"this reward model was trained on backbone {recorded}, but the backbone given is "
            f"{clip_backbone.identifier} (embed dim {clip_backbone.embed_dim})"
        )
    if config["prompt_aware"] and not clip_backbone.keep_text:
        raise CheckpointError("this reward model is prompt-aware, but the backbone given has no text tower")
    return clip_backbone
