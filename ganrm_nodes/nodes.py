"""The GAN-RM nodes (ComfyUI V3 API): load a reward model, score images, keep the best of N, train a reward model.

Scoring, selection and training are ganrm_diffusers' own functions, the same the diffusers pipeline uses; the nodes
only translate between ComfyUI values (IMAGE [B, H, W, C] in 0..1, LATENT dicts, folders) and those functions.
"""

from __future__ import annotations

import comfy.model_management as model_management
import comfy.utils
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
from ganrm_nodes import models, sampling

CATEGORY = "ganrm"
RewardModel = io.Custom("GANRM_REWARD_MODEL")


def _declared_problem(node: type[io.ComfyNode], values: dict) -> str | None:
    """ComfyUI 0.3.75 skips its own min/max and choice checks for every input a validate_inputs takes (and never
    checks V3 combos): the same checks, for those inputs. A value of the wrong type is left to ComfyUI's own
    conversion error; a missing one (None) to its missing-input error."""
    for spec in node.define_schema().inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        options = getattr(spec, "options", None)
        if options is not None and value not in options:
            return f"{spec.id}: {value!r} is not one of {list(options)}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        minimum, maximum = getattr(spec, "min", None), getattr(spec, "max", None)
        if minimum is not None and value < minimum:
            return f"{spec.id}: {value} is smaller than the minimum {minimum}"
        if maximum is not None and value > maximum:
            return f"{spec.id}: {value} is bigger than the maximum {maximum}"
    return None


def _prompts_for_batch(text: str, count: int, group_size: int) -> list[str] | None:
    """One prompt for every image, or, when the text has one line per group, each line for its group."""
    groups = count // group_size if group_size and count % group_size == 0 else 1
    prompts = sampling.group_prompts(text, groups)
    return None if prompts is None else [prompts[index // (count // groups)] for index in range(count)]


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
    def validate_inputs(cls, model_name: str | None = None) -> bool | str:
        # ComfyUI 0.3.75 does not check V3 combo values itself; a missing model should stop the prompt before
        # any sampling starts, as a node error. A missing input is ComfyUI's own error (None here).
        if model_name is None:
            return True
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


PRUNING_MODES = ["default", "off", "custom", "fk"]


class BestOfNSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="GANRMBestOfNSampler",
            display_name="GAN-RM Best-of-N Sampler",
            category=CATEGORY,
            description=(
                "KSampler that samples num_candidates candidates of each latent as one batch, scores their x0 "
                "predictions with a GAN-RM reward model at the pruning checkpoints, finishes only the best and "
                "returns the top_k. Pruning default: keep 1/4 after 30 % of the steps (8 -> 2 costs 0.475x the model "
                "evaluations of full best-of-N). A survivor is exactly the candidate the unpruned run gives, with "
                "every sampler whose step reads only its own row: the deterministic ones (euler, heun, dpmpp_2m, "
                "uni_pc, ddim...) and also the ancestral and SDE ones, whose noise is drawn for the whole batch "
                "as in the unpruned run (up to the rounding the model's kernels may give another batch size). dpm_fast and "
                "dpm_adaptive choose their own steps and cannot be pruned. FK resampling (pruning = fk) needs a "
                "sampler that adds noise (ancestral, SDE, ddpm, lcm): its images come from copied particles and do "
                "not regenerate from a seed. The summary names each kept candidate's row r: KSampler on the "
                "same seed regenerates it alone from RepeatLatentBatch(num_candidates) -> LatentFromBatch("
                "batch_index=r) of the same latent; the LATENT output carries the noise index that row gets. "
                "ControlNet runs on every candidate (ComfyUI computes it before the model call)."
            ),
            is_output_node=True,
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input(
                    "latent_image",
                    tooltip="One group of candidates per latent of the batch (with a CONDITIONING batch of the "
                    "same size, one prompt each).",
                ),
                io.Vae.Input("vae", tooltip="Decodes the candidates' x0 predictions for the reward model."),
                RewardModel.Input("reward_model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Int.Input("num_candidates", default=8, min=1, max=4096, tooltip="Candidates per latent."),
                io.Int.Input("top_k", default=1, min=1, max=4096, tooltip="Candidates returned per latent."),
                io.Combo.Input(
                    "pruning",
                    options=PRUNING_MODES,
                    default="default",
                    tooltip="default: keep 1/4 at 30 % of the steps; off: full best-of-N; custom: the checkpoints "
                    "and keep counts below; fk: Feynman-Kac resampling at the checkpoints below.",
                ),
                io.String.Input(
                    "checkpoints",
                    default="0.3",
                    tooltip="custom / fk: fractions of the steps after which candidates are scored, e.g. 0.2, 0.5",
                ),
                io.String.Input(
                    "keep",
                    default="2",
                    tooltip="custom / fk: candidates per latent kept after each checkpoint, e.g. 4, 2 "
                    "(fk: empty keeps the population).",
                ),
                io.Float.Input("fk_lambda", default=1.0, min=0.01, max=100.0, step=0.01),
                io.Combo.Input("fk_potential", options=["max", "difference", "immediate"], default="max"),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="For prompt-aware reward models: the prompt, or one line per latent.",
                ),
            ],
            outputs=[
                io.Latent.Output(display_name="latent"),
                io.Image.Output(display_name="images"),
                io.Float.Output(display_name="scores", is_output_list=True),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        steps: int | None = None,
        sampler_name: str | None = None,
        scheduler: str | None = None,
        num_candidates: int | None = None,
        top_k: int | None = None,
        pruning: str | None = None,
        checkpoints: str | None = None,
        keep: str | None = None,
        fk_lambda: float | None = None,
        fk_potential: str | None = None,
    ) -> bool | str:
        values = {key: value for key, value in locals().items() if key != "cls"}
        problem = _declared_problem(cls, values)
        if problem is not None:
            return problem
        if any(value is None for value in values.values()):
            return True  # linked or missing: checked when the node runs, or reported by ComfyUI
        numbers = (steps, num_candidates, top_k, fk_lambda)
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in numbers):
            return True  # mistyped: ComfyUI reports its own conversion error
        try:
            schedule = sampling.parse_schedule(
                pruning, checkpoints, keep, num_candidates, top_k, fk_lambda, fk_potential
            )
            sampling.check_schedule_fits(schedule, sampler_name, steps, num_candidates, top_k)
        except GanrmError as error:
            return str(error)
        return True

    @classmethod
    def execute(
        cls,
        model: object,
        positive: list,
        negative: list,
        latent_image: dict,
        vae: object,
        reward_model: models.RewardModelHandle,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        denoise: float,
        num_candidates: int,
        top_k: int,
        pruning: str,
        checkpoints: str,
        keep: str,
        fk_lambda: float,
        fk_potential: str,
        prompt: str = "",
    ) -> io.NodeOutput:
        schedule = sampling.parse_schedule(pruning, checkpoints, keep, num_candidates, top_k, fk_lambda, fk_potential)
        batch = sampling.candidate_batch(model, latent_image, num_candidates, seed)
        sampling.check_prompt_batch(positive, negative, batch.groups)
        prompts = sampling.group_prompts(prompt, batch.groups)

        def score(images: torch.Tensor, groups: list[int]) -> torch.Tensor:
            return reward_model.score(images, [prompts[group] for group in groups] if prompts else None)

        settings = sampling.SamplingSettings(seed, steps, cfg, sampler_name, scheduler, denoise)
        result = sampling.CandidateSampler(model, vae, score, positive, negative, settings, top_k, schedule).run(batch)

        latent = {key: value for key, value in latent_image.items() if key not in ("samples", "batch_index")}
        latent["samples"] = result.samples
        if pruning != "fk":  # FK's images come from copied particles: no noise index regenerates them
            latent["batch_index"] = result.batch_index
        if isinstance(batch.noise_mask, torch.Tensor) and batch.noise_mask.shape[0] == batch.rows:
            latent["noise_mask"] = batch.noise_mask[result.rows]
        summary = "\n".join(
            [
                f"{batch.groups} latent(s) x {num_candidates} candidates, {sampler_name}/{scheduler} {steps} steps, "
                f"pruning {pruning}: {result.evaluated_rows} rows through the model, "
                f"{result.evaluated_rows / max(1, result.full_rows):.3f}x full best-of-N ({result.full_rows})",
                *([f"no saving: {result.unprunable}"] if result.unprunable else []),
                *(
                    f"kept {'particle' if pruning == 'fk' else 'row'} {row}: score {value:+.4f}"
                    for row, value in zip(result.rows.tolist(), result.scores.tolist(), strict=True)
                ),
            ]
        )
        shown = _candidate_preview(cls, batch, result).as_dict() | ui.PreviewText(summary).as_dict()
        return io.NodeOutput(latent, result.images, result.scores.tolist(), summary, ui=shown)


def _candidate_preview(node: type[io.ComfyNode], batch: sampling.CandidateBatch, result: sampling.CandidateResult):
    """Every candidate (latent by latent) as last seen: finished ones with their final score and rank, pruned ones
    as their x0 prediction at the checkpoint that dropped them."""
    kept = {row: rank for rank, row in enumerate(result.rows.tolist())}
    order = [row for group in range(batch.groups) for row in range(group, batch.rows, batch.groups)]
    order = [row for row in order if row in result.last_images]
    captions = []
    for row in order:
        caption = f"{result.last_scores[row]:+.3f}"
        if row in kept:
            caption += f" kept#{kept[row] % max(1, len(kept) // batch.groups) + 1}"
        elif row in result.pruned_at:
            caption += f" cut@{result.pruned_at[row]}"
        captions.append(caption)
    pictures = torch.stack([result.last_images[row] for row in order]).movedim(-1, 1)
    columns = min(max(1, len(order) // batch.groups), 8)
    return ui.PreviewImage(_image_tensor(score_grid(pictures, captions=captions, columns=columns)), cls=node)


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
                    tooltip="Folder of target images inside ComfyUI's input folder (relative to it).",
                ),
                io.Image.Input("positives", optional=True, tooltip="Target images as a batch (instead of a folder)."),
                io.String.Input(
                    "backbone",
                    default="ViT-H-14",
                    tooltip="open_clip model name, hf-hub:<id>, or local-dir:<folder under ComfyUI/models>.",
                ),
                io.String.Input(
                    "pretrained",
                    default="laion2b_s32b_b79k",
                    tooltip="open_clip pretrained tag, or a .safetensors file under ComfyUI/models; 'none' for random "
                    "weights. A tag's weights are downloaded by open_clip on first use (never with HF_HUB_OFFLINE=1).",
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
        backbone, weights = models.backbone_arguments(backbone, pretrained)
        positive_source = _positive_source(positives, positives_folder)
        _check_images(negatives)
        progress = comfy.utils.ProgressBar(max_epochs)
        # ComfyUI runs nodes under torch.inference_mode; training the head needs autograd.
        with torch.inference_mode(False), torch.enable_grad():
            model = GANRewardModel(backbone=backbone, pretrained=weights)
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
    return models.target_folder(folder)


class GanrmExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadRewardModel, ScoreImages, BestOfN, BestOfNSampler, TrainRewardModel]


async def comfy_entrypoint() -> GanrmExtension:
    models.register_model_folder()
    return GanrmExtension()
