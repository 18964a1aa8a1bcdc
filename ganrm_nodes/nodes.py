"""The GAN-RM nodes (ComfyUI V3 API): load a reward model, score images, keep the best of N, train a reward model.

Scoring, selection and training are ganrm_diffusers' own functions, the same the diffusers pipeline uses; the nodes
only translate between ComfyUI values (IMAGE [B, H, W, C] in 0..1, LATENT dicts, folders) and those functions.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_management as model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import ComfyExtension, io, ui
from comfy_execution.graph_utils import ExecutionBlocker
from PIL import Image
from typing_extensions import override

from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.reward.training import RewardTrainingConfig, fit_reward_model, save_training_outputs
from ganrm_diffusers.utils.errors import GanrmError, ImageInputError
from ganrm_diffusers.utils.plots import score_grid
from ganrm_nodes import models

CATEGORY = "ganrm"
RewardModel = io.Custom("GANRM_REWARD_MODEL")


def _prompts_for_batch(text: str, count: int, group_size: int) -> list[str] | None:
    """One prompt for every image, or, when the text has one line per group, each line for its group."""
    text = text.strip()
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    groups = count // group_size if group_size and count % group_size == 0 else 1
    if groups > 1 and len(lines) == groups:
        return [line for line in lines for _ in range(group_size)]
    return [text] * count


def _check_images(images: torch.Tensor) -> None:
    if images.shape[0] == 0:
        raise ImageInputError("the IMAGE batch is empty: there is nothing to score")


def _image_tensor(picture) -> torch.Tensor:
    """A PIL picture as a one-image ComfyUI IMAGE batch."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _score_lines(scores: torch.Tensor) -> list[str]:
    probabilities = torch.sigmoid(scores).tolist()
    return [
        f"image {index}: score {score:+.4f}, p={probability:.3f}"
        for index, (score, probability) in enumerate(zip(scores.tolist(), probabilities, strict=True))
    ]


class LoadRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMLoadRewardModel",
            display_name="GAN-RM Load Reward Model",
            category=CATEGORY,
            description="Load a GAN-RM reward model from models/reward_models or a Hub id in the local cache.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=models.available_models(),
                    tooltip="A checkpoint folder under models/reward_models, or hub:<id> from the "
                    "local Hugging Face cache (nothing is downloaded).",
                ),
            ],
            outputs=[RewardModel.Output(display_name="reward_model")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        # ComfyUI 0.3.75 does not check V3 combo values itself; a missing model should stop the prompt before
        # any sampling starts, as a node error.
        if model_name in models.available_models():
            return True
        return f"reward model {model_name!r} is not in the reward_models folders nor in the Hugging Face cache"

    @classmethod
    def fingerprint_inputs(cls, model_name: str) -> str:
        return models.checkpoint_stamp(model_name)

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        return io.NodeOutput(models.load(model_name))


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMScoreImages",
            display_name="GAN-RM Score Images",
            category=CATEGORY,
            description="Score every image of a batch with a GAN-RM reward model (higher = more like the target set).",
            is_output_node=True,
            inputs=[
                RewardModel.Input("reward_model"),
                io.Image.Input("images"),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="For prompt-aware reward models: the prompt of the images.",
                ),
            ],
            outputs=[
                io.Float.Output(
                    display_name="scores", is_output_list=True, tooltip="One reward (logit) per image, in batch order."
                ),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def execute(cls, reward_model: models.RewardModelHandle, images: torch.Tensor, prompt: str = "") -> io.NodeOutput:
        _check_images(images)
        scores = reward_model.score(images, _prompts_for_batch(prompt, len(images), len(images)))
        best, worst = int(scores.argmax()), int(scores.argmin())
        summary = "\n".join(
            [
                f"{len(scores)} images scored by {reward_model.name}: mean {scores.mean().item():+.4f}, "
                f"best image {best} ({scores[best].item():+.4f}), worst image {worst} ({scores[worst].item():+.4f})",
                *_score_lines(scores),
            ]
        )
        return io.NodeOutput(scores.tolist(), summary, ui=ui.PreviewText(summary))


class BestOfN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMBestOfN",
            display_name="GAN-RM Best-of-N",
            category=CATEGORY,
            description="Keep the top-k images of a batch (or of each group of a batch) by GAN-RM reward, with "
            "their latents, and preview every image with its score.",
            is_output_node=True,
            inputs=[
                RewardModel.Input("reward_model"),
                io.Image.Input("images"),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="The latents of the images (same batch order): the selected ones are passed "
                    "on, e.g. for a second sampling pass or an upscale.",
                ),
                io.Int.Input("top_k", default=1, min=1, max=4096, tooltip="Images kept per group."),
                io.Int.Input(
                    "group_size",
                    default=0,
                    min=0,
                    max=4096,
                    tooltip="Select within each run of this many consecutive images (one prompt's "
                    "candidates); 0 = the whole batch is one group.",
                ),
                io.Boolean.Input(
                    "use_threshold", default=False, tooltip="Never keep an image scoring below the threshold."
                ),
                io.Float.Input("threshold", default=0.0, min=-1000.0, max=1000.0, step=0.01),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="For prompt-aware reward models: the prompt, or one line per group.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Latent.Output(display_name="latent"),
                io.Float.Output(display_name="scores", is_output_list=True),
                io.Image.Output(display_name="rejected"),
            ],
        )

    @classmethod
    def execute(
        cls,
        reward_model: models.RewardModelHandle,
        images: torch.Tensor,
        top_k: int,
        group_size: int,
        use_threshold: bool,
        threshold: float,
        latent: dict | None = None,
        prompt: str = "",
    ) -> io.NodeOutput:
        _check_images(images)
        count = len(images)
        group_size = group_size or count
        if latent is not None and len(latent["samples"]) != count:
            raise ImageInputError(
                f"the LATENT batch has {len(latent['samples'])} latents for {count} images: "
                "connect the latents the images were decoded from"
            )
        scores = reward_model.score(images, _prompts_for_batch(prompt, count, group_size))
        selection = select_top_k(scores, top_k, group_size, threshold if use_threshold else None)
        chosen, rejected = selection.selected, selection.rejected

        captions = [f"{score:+.3f}" for score in scores.tolist()]
        kept_in_group: dict[int, int] = {}  # selection is best first within each group
        for index, group in zip(chosen.tolist(), selection.groups.tolist(), strict=True):
            kept_in_group[group] = kept_in_group.get(group, 0) + 1
            captions[index] += f" kept#{kept_in_group[group]}"
        preview = ui.PreviewImage(
            _image_tensor(score_grid(images.movedim(-1, 1), captions=captions, columns=min(group_size, 8))), cls=cls
        )
        if len(chosen) == 0:
            # Nothing reached the threshold: downstream nodes (Save Image, ...) are skipped, not fed an empty batch.
            skipped = ExecutionBlocker(None)
            return io.NodeOutput(skipped, skipped, skipped, images, ui=preview)
        if latent is None:
            selected_latent = ExecutionBlocker(
                "GAN-RM Best-of-N has no LATENT input, so its latent output is empty: "
                "connect the sampler's LATENT to it"
            )
        else:
            selected_latent = _select_latent(latent, chosen, count)
        rejected_images = images[rejected] if len(rejected) else ExecutionBlocker(None)
        return io.NodeOutput(images[chosen], selected_latent, selection.scores.tolist(), rejected_images, ui=preview)


def _select_latent(latent: dict, indices: torch.Tensor, count: int) -> dict:
    """The LATENT dict restricted to `indices`, keeping per-image entries (noise_mask, batch_index) aligned."""
    selected = dict(latent)
    selected["samples"] = latent["samples"][indices]
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim > 0 and mask.shape[0] == count:
        selected["noise_mask"] = mask[indices]
    if "batch_index" in latent:
        selected["batch_index"] = [latent["batch_index"][index] for index in indices.tolist()]
    return selected


class TrainRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GANRMTrainRewardModel",
            display_name="GAN-RM Train Reward Model",
            category=CATEGORY,
            description="Train a GAN-RM reward model: target images (a folder or an IMAGE batch) are positives, "
            "your generations are negatives. Saved into models/reward_models/<name>.",
            is_output_node=True,
            inputs=[
                io.Image.Input("negatives", tooltip="Generated images (what the model makes today)."),
                io.String.Input("name", default="my-reward-model", tooltip="Folder name under models/reward_models."),
                io.String.Input(
                    "positives_folder",
                    default="",
                    tooltip="Folder of target images: absolute, or relative to ComfyUI's input folder.",
                ),
                io.Image.Input("positives", optional=True, tooltip="Target images as a batch (instead of a folder)."),
                io.String.Input("backbone", default="ViT-H-14", tooltip="open_clip model name (or local-dir:<path>)."),
                io.String.Input(
                    "pretrained",
                    default="laion2b_s32b_b79k",
                    tooltip="open_clip pretrained tag or weights file; 'none' for random weights. A tag's weights "
                    "are downloaded by open_clip on first use (never with HF_HUB_OFFLINE=1).",
                ),
                io.Int.Input("max_epochs", default=RewardTrainingConfig.max_epochs, min=1, max=100000),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing reward model of the same name."
                ),
            ],
            outputs=[RewardModel.Output(display_name="reward_model"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(
        cls,
        negatives: torch.Tensor,
        name: str,
        positives_folder: str,
        backbone: str,
        pretrained: str,
        max_epochs: int,
        seed: int,
        overwrite: bool,
        positives: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        destination = models.save_folder(name.strip())
        if destination.exists() and not overwrite:
            raise GanrmError(f"reward model {destination} already exists: choose another name or set overwrite")
        positive_source = _positive_source(positives, positives_folder)
        _check_images(negatives)
        progress = comfy.utils.ProgressBar(max_epochs)
        # ComfyUI runs nodes under torch.inference_mode; training the head needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            model = GANRewardModel(backbone=backbone.strip(), pretrained=pretrained.strip() or None)
            # The frozen encoder embeds every image once: on ComfyUI's device, after making room for it there.
            device = model_management.get_torch_device()
            model_management.free_memory(2 * model_management.module_size(model), device)
            model = model.to(device)
            model, report = fit_reward_model(
                positive_source,
                negatives.movedim(-1, 1).clone(),
                model=model,
                config=RewardTrainingConfig(max_epochs=max_epochs, seed=seed),
                description=f"trained in ComfyUI from {positives_folder.strip() or 'an IMAGE batch'}",
                progress=lambda step, total: progress.update_absolute(step, total),
                should_stop=model_management.processing_interrupted,
            )
        model_management.throw_exception_if_processing_interrupted()  # an interrupted run saves nothing
        curves = save_training_outputs(model, report, destination)
        metrics = report.metrics
        summary = (
            f"reward model saved to {destination}\nheld-out AUC {metrics['val_auc']:.3f}, accuracy "
            f"{metrics['val_accuracy']:.3f}, best epoch {metrics['best_epoch']} of {metrics['epochs']}"
        )
        with Image.open(curves) as picture:
            preview = ui.PreviewImage(_image_tensor(picture), cls=cls)
        return io.NodeOutput(models.RewardModelHandle(model, name.strip()), summary, ui=preview)


def _positive_source(positives: torch.Tensor | None, folder: str) -> object:
    folder = folder.strip()
    if positives is not None and folder:
        raise GanrmError("give the target images either as a folder or as an IMAGE batch, not both")
    if positives is not None:
        _check_images(positives)
        return positives.movedim(-1, 1).clone()
    if not folder:
        raise GanrmError("no target images: set positives_folder or connect a positives IMAGE batch")
    path = Path(folder).expanduser()
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


class GanrmExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadRewardModel, ScoreImages, BestOfN, TrainRewardModel]


async def comfy_entrypoint() -> GanrmExtension:
    models.register_model_folder()
    return GanrmExtension()
