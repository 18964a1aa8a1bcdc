"""Best-of-N generation for diffusers, guided by a GAN-RM reward model, with early pruning.

`RewardGuidedPipeline` (Stable Diffusion 1.x/2.x) and `RewardGuidedXLPipeline` (SDXL) are diffusers' own pipelines
with the reward model as one more (optional) component, so the whole thing saves, loads, moves between devices and
wraps an already loaded pipeline the diffusers way:

    rm = GANRewardModel.from_pretrained("someone/ganrm-my-style")
    pipe = RewardGuidedPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", reward_model=rm)
    out = pipe("a cat", num_candidates=16, top_k=2, prune=True)

Every candidate has its own seed and noise generator, so a returned image is exactly what the plain base pipeline
makes from that seed: `StableDiffusionPipeline(...)(prompt, generator=torch.Generator("cpu").manual_seed(seed))`
with the same settings. Candidates are scored on their decoded tensors, on the device.

One loop serves every model family: `RewardGuidedMixin.__call__` (candidates, checkpoints, selection, outputs). A
family is a thin adapter of hooks (text conditioning, timesteps, starting noise, the model call with its guidance,
the sampler step, decoding): `UNetFamilyMixin` here for UNet pipelines, `FlowFamilyMixin` in `pipeline_flow.py`
for flow-matching transformers (SD3.x, FLUX.1, FLUX.2 klein, Qwen-Image). `load_reward_guided_pipeline` picks the
family of a saved pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from ganrm_diffusers.generation.lora import check_lora_compatible
from ganrm_diffusers.generation.pruning import (
    CandidateSchedule,
    FKResampling,
    Lineage,
    ScheduleError,
    Survivors,
    as_schedule,
    deterministic_steps,
    predicted_clean_latents,
    select_scheduler_state,
)
from ganrm_diffusers.generation.sampling import Conditioning, decode_latents, guidance_embedding, guided_noise_pred
from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.reward.model import GANRewardModel
from ganrm_diffusers.utils.errors import GanrmError

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SEED_LIMIT = 2**31  # seeds stay plain JSON integers


def _register_with_diffusers() -> None:
    """Make `ganrm_diffusers` a library that diffusers saves and loads components from, as it does transformers.

    Without it, model_index.json records the reward model under its module path, which loads from a local folder
    but not from the Hub: diffusers' download refuses a component whose library it does not know unless the repo
    ships its code (to run with trust_remote_code). Registered, the entry is ["ganrm_diffusers", "GANRewardModel"]
    and diffusers calls GANRewardModel's own save_pretrained / from_pretrained.
    """
    from diffusers.pipelines import pipeline_loading_utils

    methods = ["save_pretrained", "from_pretrained"]
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault("ganrm_diffusers", {"GANRewardModel": methods})
    pipeline_loading_utils.ALL_IMPORTABLE_CLASSES.setdefault("GANRewardModel", methods)


_register_with_diffusers()


class PipelineInputError(GanrmError, ValueError):
    """Arguments a reward-guided pipeline cannot work with (no reward model, bad counts, seeds or sizes)."""


@dataclass
class RewardGuidedPipelineOutput(BaseOutput):
    """What a reward-guided call returns, prompt-major (all images of the first prompt come first).

    images: the `top_k` best images of each prompt, best first (PIL list, NHWC numpy, NCHW tensor in [0, 1], or
        latents, as `output_type` asks). scores: their rewards (float32, CPU). seeds: the seed that regenerates
        each with the plain pipeline; None for an image whose `FKResampling` lineage left its own seed.
    lineages: under `FKResampling`, the `Lineage` of each image (its ancestor seed and the candidate it took its
        latents from at each resampling checkpoint); None otherwise. candidate_lineages: the same for every
        candidate with `return_candidates` (a candidate stopped early: its lineage when it stopped).
    With `return_candidates=True`, all `num_candidates` candidates of each prompt in seed order: candidates,
    candidate_scores, candidate_seeds (under `FKResampling`, candidate i is the particle that ended in slot i,
    whatever its lineage: see candidate_lineages), and candidate_steps (the denoising steps each received: a
    candidate that pruning stopped early is returned as the decoded x0 prediction it was judged on, with that
    score), and
    checkpoint_scores: for each checkpoint of the `prune` schedule (keyed by the steps done), the reward of every
    candidate's x0 prediction there (NaN for candidates no longer live). `PruneSchedule(at=..., keep=(1.0, ...))`
    only probes: it shows how well early rewards predict final ones, at the cost of the decoding and scoring.
    nsfw_content_detected: the safety checker's verdict on `images`, when the pipeline has one.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    scores: torch.Tensor
    seeds: list[int | None]
    lineages: list[Lineage] | None = None
    candidates: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    candidate_scores: torch.Tensor | None = None
    candidate_seeds: list[int] | None = None
    candidate_steps: list[int] | None = None
    checkpoint_scores: dict[int, torch.Tensor] | None = None
    candidate_lineages: list[Lineage] | None = None
    nsfw_content_detected: list[bool] | None = None


def resolve_candidate_seeds(
    count: int,
    seeds: list[int] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """One seed per candidate: `seeds` as given, else `seed, seed + 1, ...`, else drawn from `generator` (or from
    torch's global generator, so `torch.manual_seed` makes a call repeatable)."""
    if seeds is not None:
        if seed is not None:
            raise PipelineInputError("pass either seeds (one per candidate) or seed, not both")
        seeds = [int(value) for value in seeds]
        if len(seeds) != count:
            raise PipelineInputError(f"got {len(seeds)} seeds for {count} candidates (one per candidate, prompt-major)")
        if any(not 0 <= value < 2**63 for value in seeds):
            raise PipelineInputError("seeds must be integers in [0, 2**63)")
        return seeds
    if seed is not None:
        return [int(seed) + index for index in range(count)]
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, SEED_LIMIT, (count,), generator=generator, device=device).tolist()


@dataclass
class _LiveCandidates:
    """The candidates still being denoised, prompt-major with the same number per prompt: their latents, their
    index in the call's seed list (`ids`, the slot whose noise generator each draws from), and under resampling
    their lineage: the candidate each started from (`ancestors`) and the one whose latents each took at every
    resampling checkpoint so far (`parents`, one column per checkpoint, keyed in `parent_steps`)."""

    latents: torch.Tensor
    ids: torch.Tensor
    generators: list[torch.Generator]
    num_prompts: int
    num_candidates: int
    ancestors: torch.Tensor | None = None
    parents: torch.Tensor | None = None
    parent_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ancestors = self.ids.clone() if self.ancestors is None else self.ancestors
        self.parents = torch.empty(len(self.ids), 0, dtype=torch.long) if self.parents is None else self.parents

    @property
    def per_prompt(self) -> int:
        return len(self.ids) // self.num_prompts

    @property
    def prompt_rows(self) -> torch.Tensor:
        """The prompt of each live candidate (its index in the call's prompt list)."""
        return self.ids // self.num_candidates

    def go_on_with(self, survivors: Survivors, scheduler: object, steps_done: int) -> None:
        """Continue with the survivors of a checkpoint (scheduler state that is kept per sample follows them)."""
        offsets = torch.arange(self.num_prompts).unsqueeze(1) * self.per_prompt
        parents = (survivors.parents + offsets).flatten()
        select_scheduler_state(scheduler, parents, self.latents.shape)
        if survivors.inherit_identity:
            slots = parents
        else:  # resampling: slot j keeps its own seed and noise, and takes its parent's latents (and lineage)
            slots = (torch.arange(survivors.parents.shape[1]) + offsets).flatten()
            self.parents = torch.cat([self.parents[parents], self.ids[parents].unsqueeze(1)], dim=1)
            self.parent_steps.append(steps_done)
        self.ancestors = self.ancestors[parents]
        self.latents = self.latents[parents.to(self.latents.device)]
        self.ids = self.ids[slots]
        self.generators = [self.generators[slot] for slot in slots.tolist()]

    def seed_of(self, position: int, seeds: list[int]) -> int | None:
        """The seed that regenerates live candidate `position`: its slot's, unless resampling gave it another
        lineage (its latents came from another slot at some checkpoint)."""
        slot = int(self.ids[position])
        return seeds[slot] if bool((self.parents[position] == slot).all()) else None

    def lineage(self, position: int, seeds: list[int]) -> Lineage:
        ancestor = int(self.ancestors[position])
        parents = dict(zip(self.parent_steps, self.parents[position].tolist(), strict=True))
        slot = int(self.ids[position])
        return Lineage(ancestor, seeds[ancestor], parents, slot, self.seed_of(position, seeds))

    def lineages(self, seeds: list[int]) -> dict[int, Lineage]:
        """The lineage of every live candidate, keyed by its slot (its index in the call's seed list)."""
        return {int(slot): self.lineage(position, seeds) for position, slot in enumerate(self.ids)}


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from ganrm_diffusers import GANRewardModel, RewardGuidedPipeline, PruneSchedule

        >>> reward_model = GANRewardModel.from_pretrained("you/ganrm-my-style")
        >>> pipe = RewardGuidedPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", reward_model=reward_model, torch_dtype=torch.float16
        ... ).to("cuda")
        >>> out = pipe("a watercolor fox", num_candidates=8, seed=0, prune=PruneSchedule())
        >>> out.images[0].save("fox.png")  # the best of 8; out.scores and out.seeds beside it
        ```
"""


class RewardGuidedMixin:
    """Best-of-N with a reward model over a diffusers text-to-image pipeline, whatever its model family.

    A family adapter provides the hooks of the last section below (`UNetFamilyMixin`, `FlowFamilyMixin`); a
    pipeline class combines one adapter with the base diffusers pipeline and registers a `reward_model` component.
    """

    default_guidance_scale: float = 7.5
    # What `callback_on_step_end` may ask for: the live candidates' latents and their noise prediction.
    _callback_tensor_inputs = ["latents", "noise_pred"]

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str],
        *,
        num_candidates: int = 4,
        top_k: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        eta: float = 0.0,
        seeds: list[int] | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        candidate_batch_size: int | None = None,
        prune: CandidateSchedule | bool | None = None,
        output_type: str = "pil",
        return_candidates: bool = False,
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **conditioning_kwargs: object,
    ) -> RewardGuidedPipelineOutput | tuple:
        """Generate `num_candidates` images per prompt, score them with the reward model, return the `top_k` best.

        Arguments of the base pipeline keep their meaning (`guidance_scale` defaults to the base pipeline's); SDXL
        takes its extra conditioning arguments (prompt_2, negative_prompt_2, original_size, ...) as keywords.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); each gets its own candidates.
            num_candidates (`int`, defaults to 4): candidates per prompt.
            top_k (`int`, defaults to 1): images returned per prompt (selected per prompt, never across prompts).
            seeds (`list[int]`, *optional*): one seed per candidate, prompt-major. Or `seed` (candidates get seed,
                seed + 1, ...), or `generator`, from which seeds are drawn. The seed of each returned image
                regenerates it with the plain base pipeline: `generator=torch.Generator("cpu").manual_seed(seed)`
                (under `FKResampling`, None where resampling gave the image another lineage: see `lineages`).
            eta (`float`, defaults to 0): DDIM's eta for UNet pipelines; for flow-matching ones (SD3, FLUX) the
                noise level in [0, 1) of the stochastic flow step (`flow_sampling`). 0: the deterministic sampler,
                whose seeds regenerate with the plain pipeline; FK resampling needs eta > 0.
            candidate_batch_size (`int`, *optional*): candidates per UNet, VAE and reward model call (default: all
                at once), so many candidates fit where the base pipeline's batch fits. The result does not depend
                on it.
            prune (`bool`, `PruneSchedule` or `FKResampling`, *optional*): `True` for the default `PruneSchedule()`:
                stop the least promising candidates early (see `ganrm_diffusers.generation.pruning`).
            return_candidates (`bool`, defaults to `False`): also return every candidate with its score, seed and
                number of steps.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called
                after each denoising step as `callback_on_step_end(self, step, timestep, callback_kwargs)` with the
                tensors named in `callback_on_step_end_tensor_inputs` (of `_callback_tensor_inputs`: the live
                candidates' `latents` and `noise_pred`); returned `latents` replace the live latents (same shape).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): defaults to `["latents"]`.

        Examples:

        Returns:
            `RewardGuidedPipelineOutput` (or, with `return_dict=False`, a tuple of images, scores and seeds).
        """
        self._require_reward_model()
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = [name for name in callback_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise PipelineInputError(
                f"callback_on_step_end_tensor_inputs {unknown} are not among {self._callback_tensor_inputs}"
            )
        self._interrupt = False
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self._default_image_size()
        width = width or self._default_image_size()
        self._check_call(prompts, num_candidates, top_k, output_type, height, width, candidate_batch_size)
        schedule = as_schedule(prune)
        self._check_schedule(schedule, eta)
        self.set_call_state(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device = self._execution_device
        seeds = resolve_candidate_seeds(len(prompts) * num_candidates, seeds, seed, generator)
        chunk = candidate_batch_size or len(seeds)

        # 1. Text conditioning once per prompt; each candidate uses its prompt's row.
        conditioning = self._encode_conditioning(prompts, negative_prompt, height, width, device, **conditioning_kwargs)

        # 2. Timesteps, and each candidate's noise drawn from its own generator, as the base pipeline draws it.
        timesteps, num_inference_steps = self._prepare_timesteps(
            num_inference_steps, device, timesteps, sigmas, height, width
        )
        generators = [torch.Generator("cpu").manual_seed(value) for value in seeds]
        latents = self._prepare_candidate_latents(
            len(seeds), height, width, conditioning.prompt_embeds.dtype, device, generators
        )
        live = _LiveCandidates(latents, torch.arange(len(seeds)), generators, len(prompts), num_candidates)
        run = schedule.start(len(timesteps), top_k, seeds, num_candidates) if schedule is not None else None
        stopped: dict[int, tuple[torch.Tensor, float, int]] = {}  # pruned id -> (x0 preview, its score, steps)
        stopped_lineages: dict[int, Lineage] = {}  # FK: a stopped particle's lineage when it stopped
        resampling = isinstance(schedule, FKResampling)
        checkpoint_scores: dict[int, torch.Tensor] = {}

        # 3. Denoise the live candidates; at each checkpoint of the schedule keep only the promising ones.
        self._num_timesteps = len(timesteps)
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        live_conditioning = conditioning.select(live.prompt_rows)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents_before = live.latents
                noise_pred = self._model_output(latents_before, t, live_conditioning, chunk)
                step = self._denoise_step(noise_pred, t, i, latents_before, live.generators, eta)
                live.latents = step.prev_sample
                if callback_on_step_end is not None:
                    live.latents = self._step_end(callback_on_step_end, callback_inputs, i, t, live, noise_pred)
                if run is not None and i in run.checkpoints:
                    x0 = predicted_clean_latents(self.scheduler, step, noise_pred, t, latents_before)
                    judged = live.ids
                    if resampling and return_candidates:
                        stopped_lineages.update(live.lineages(seeds))
                    scores, stops = self._checkpoint(live, run, i, x0, prompts, chunk, output_type, return_candidates)
                    checkpoint_scores[i + 1] = torch.full((len(seeds),), float("nan")).index_put_((judged,), scores)
                    stopped.update(stops)
                    live_conditioning = conditioning.select(live.prompt_rows)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 4. Decode and score the finished candidates; keep the top_k of each prompt.
        images, scores = self._decode_and_score(live.latents, prompts, live.prompt_rows, chunk)
        selection = select_top_k(scores, top_k, group_size=live.per_prompt)
        chosen = selection.selected
        outputs = (
            self._output_latents(live.latents[chosen.to(live.latents.device)])
            if output_type == "latent"
            else images[chosen.to(images.device)]
        )
        nsfw = None
        if output_type != "latent":
            outputs, nsfw = self._finish_images(outputs, device, conditioning.prompt_embeds.dtype)
        result = RewardGuidedPipelineOutput(
            images=self._postprocess(outputs, output_type),
            scores=selection.scores,
            seeds=[live.seed_of(position, seeds) for position in chosen.tolist()],
            lineages=[live.lineage(position, seeds) for position in chosen.tolist()] if resampling else None,
            nsfw_content_detected=nsfw,
        )
        if return_candidates:
            finished = images if output_type != "latent" else self._output_latents(live.latents)
            candidates, candidate_scores, steps = self._gather_candidates(
                finished, scores, live.ids, stopped, len(seeds), len(timesteps)
            )
            result.candidates = self._postprocess(candidates, output_type)
            result.candidate_scores = candidate_scores
            result.candidate_seeds = list(seeds)
            result.candidate_steps = steps
            result.checkpoint_scores = checkpoint_scores
            if resampling:  # each slot's last lineage: at the end, or when the particle stopped
                lineages = {**stopped_lineages, **live.lineages(seeds)}
                result.candidate_lineages = [lineages[index] for index in range(len(seeds))]
        self.maybe_free_model_hooks()
        if not return_dict:
            return result.images, result.scores, result.seeds
        return result

    # ----------------------------------------------------------------------------------------------------------
    # Steps of a call

    def _step_end(
        self,
        callback: Callable[..., dict],
        names: list[str],
        step: int,
        t: torch.Tensor,
        live: _LiveCandidates,
        noise_pred: torch.Tensor,
    ) -> torch.Tensor:
        """diffusers' `callback_on_step_end` protocol; returns the live latents, replaced where the callback did."""
        tensors = {"latents": live.latents, "noise_pred": noise_pred}
        outputs = callback(self, step, t, {name: tensors[name] for name in names}) or {}
        latents = outputs.get("latents", live.latents)
        if latents.shape != live.latents.shape:
            raise PipelineInputError(
                f"callback_on_step_end returned latents of shape {tuple(latents.shape)}; the live candidates' are "
                f"{tuple(live.latents.shape)}"
            )
        return latents

    def _checkpoint(
        self,
        live: _LiveCandidates,
        run: object,
        step_index: int,
        x0: torch.Tensor,
        prompts: list[str],
        chunk: int,
        output_type: str,
        keep_previews: bool,
    ) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, float, int]]]:
        """Score the live candidates' x0 predictions and go on with the schedule's survivors. Returns the scores
        and, when `keep_previews`, the candidates that stopped here: id -> (the x0 preview they were judged on,
        its score, the steps they received)."""
        previews, scores = self._decode_and_score(x0, prompts, live.prompt_rows, chunk)
        before = live.ids.tolist()
        live.go_on_with(run.survivors(step_index, scores.view(live.num_prompts, -1)), self.scheduler, step_index + 1)
        if not keep_previews:
            return scores, {}
        shown = self._output_latents(x0) if output_type == "latent" else previews
        gone = set(before) - set(live.ids.tolist())
        return scores, {
            candidate: (shown[position], float(scores[position]), step_index + 1)
            for position, candidate in enumerate(before)
            if candidate in gone
        }

    def _decode_and_score(
        self, latents: torch.Tensor, prompts: list[str], prompt_rows: torch.Tensor, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (on the VAE's device) and their rewards (CPU), `chunk` at a time, no PIL round trip."""
        images = self._decode(latents, chunk)
        texts = [prompts[row] for row in prompt_rows.tolist()]
        scores = self.reward_model.score(images, texts, batch_size=chunk, value_range=(0.0, 1.0))
        return images, scores.float().cpu()

    def _gather_candidates(
        self,
        finished: torch.Tensor,
        finished_scores: torch.Tensor,
        finished_ids: torch.Tensor,
        stopped: dict[int, tuple[torch.Tensor, float, int]],
        count: int,
        num_steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """All candidates in seed order: finished ones, and pruned ones as the x0 preview they were judged on."""
        candidates = finished.new_zeros((count, *finished.shape[1:]))
        scores = torch.full((count,), float("nan"))
        steps = [0] * count
        for position, index in enumerate(finished_ids.tolist()):
            candidates[index], scores[index], steps[index] = finished[position], finished_scores[position], num_steps
        for index, (preview, score, done) in stopped.items():
            if steps[index] == 0:
                candidates[index], scores[index], steps[index] = preview.to(candidates), score, done
        return candidates, scores, steps

    def _postprocess(self, images: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Latents stay latents; images in [0, 1] become what `output_type` asks, through diffusers' processor."""
        if output_type == "latent":
            return images
        return self.image_processor.postprocess(images, output_type=output_type, do_denormalize=[False] * len(images))

    # ----------------------------------------------------------------------------------------------------------
    # Checks and components

    def _require_reward_model(self) -> GANRewardModel:
        if getattr(self, "reward_model", None) is None:
            raise PipelineInputError(
                "this pipeline has no reward model: pass reward_model=GANRewardModel.from_pretrained(...) to "
                "from_pretrained or from_pipe, or call pipe.set_reward_model(model)"
            )
        return self.reward_model

    def set_reward_model(self, reward_model: GANRewardModel | None) -> None:
        """Register (or replace, or remove) the reward model, so that save_pretrained stores it."""
        self.register_modules(reward_model=reward_model)

    def _check_schedule(self, schedule: CandidateSchedule | None, eta: float) -> None:
        """FK resampling duplicates particles; on deterministic steps the copies never diverge, so the call would
        silently return copies of one image (top_k could return the same image twice)."""
        self._check_eta(eta)
        if isinstance(schedule, FKResampling) and self._is_deterministic(eta):
            raise ScheduleError(
                f"FKResampling needs a stochastic sampler, but {type(self.scheduler).__name__} with eta={eta} adds no "
                "noise: resampled copies of a particle would stay identical (and top_k could return one image "
                "twice). Pass eta > 0 with DDIM (SD3 / FLUX: eta in (0, 1), the stochastic flow step), use a stochastic "
                "scheduler, or prune with PruneSchedule"
            )

    def _check_call(
        self,
        prompts: list[str],
        num_candidates: int,
        top_k: int,
        output_type: str,
        height: int,
        width: int,
        candidate_batch_size: int | None,
    ) -> None:
        if not prompts or not all(isinstance(text, str) for text in prompts):
            raise PipelineInputError("prompt must be a string or a non-empty list of strings")
        if num_candidates < 1:
            raise PipelineInputError(f"num_candidates must be at least 1, got {num_candidates}")
        if not 1 <= top_k <= num_candidates:
            raise PipelineInputError(f"top_k must be between 1 and num_candidates ({num_candidates}), got {top_k}")
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        multiple = self._size_multiple()
        if height % multiple or width % multiple:
            raise PipelineInputError(f"height and width must be divisible by {multiple}, got {height}x{width}")
        if candidate_batch_size is not None and candidate_batch_size < 1:
            raise PipelineInputError(f"candidate_batch_size must be at least 1, got {candidate_batch_size}")

    def set_call_state(
        self,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> None:
        """The settings a call keeps on the pipeline, where the base pipeline's properties and the family hooks
        read them (`guidance_scale`, `do_classifier_free_guidance`, ...). The trainers' samplers set them once."""
        self._guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs) -> DiffusionPipeline:
        """Wrap an already loaded pipeline (its modules are shared, not copied). Unlike diffusers' default, the
        modules keep their dtype unless `torch_dtype` is given (diffusers would cast shared fp16 weights to fp32)."""
        if "torch_dtype" not in kwargs and "dtype" not in kwargs and pipeline.dtype != torch.float32:
            kwargs["torch_dtype"] = pipeline.dtype  # diffusers' from_pipe casts to float32 by default
        return super().from_pipe(pipeline, **kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # What a model family's adapter provides (see `UNetFamilyMixin` here and `generation/pipeline_flow.py`)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model evaluated at every step (a UNet, or a flow-matching transformer)."""
        raise NotImplementedError

    def _encode_conditioning(
        self, prompts: list[str], negative_prompt, height: int, width: int, device: torch.device, **kwargs
    ) -> Conditioning:
        """The text conditioning of each prompt (one row per prompt), with the family's own encoders."""
        raise NotImplementedError

    def _prepare_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, int]:
        """Set the scheduler's timesteps as the base pipeline does; returns (timesteps, number of steps)."""
        raise NotImplementedError

    def _prepare_candidate_latents(
        self,
        count: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generators: list[torch.Generator],
    ) -> torch.Tensor:
        """The starting noise of `count` candidates, each drawn from its own generator as the base pipeline draws
        a batch of one, so that a candidate's seed regenerates it."""
        raise NotImplementedError

    def _model_output(
        self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, chunk: int
    ) -> torch.Tensor:
        """The (guided) model output of every live candidate, `chunk` candidates per model call."""
        raise NotImplementedError

    def _denoise_step(
        self,
        model_output: torch.Tensor,
        t: torch.Tensor,
        step_index: int,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        eta: float,
    ) -> object:
        """One sampler step; returns an object with `prev_sample` (and `pred_original_sample` where known)."""
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], decoded as the base pipeline decodes them."""
        raise NotImplementedError

    def _output_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the base pipeline returns them with `output_type="latent"` (the sampler's own by default)."""
        return latents

    def _finish_images(
        self, images: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[bool] | None]:
        """What the base pipeline does to its images after decoding (safety checker, watermark); None: nothing."""
        return images, None

    def _is_deterministic(self, eta: float) -> bool:
        """Whether the sampler adds no noise (FK resampling would then duplicate particles for nothing)."""
        raise NotImplementedError

    def _check_eta(self, eta: float) -> None:
        if eta < 0:
            raise PipelineInputError(f"eta must be >= 0, got {eta}")

    def _size_multiple(self) -> int:
        """Image sizes must be multiples of this."""
        return 8

    def _default_image_size(self) -> int:
        raise NotImplementedError


class UNetFamilyMixin(RewardGuidedMixin):
    """The adapter for UNet + DDIM-family pipelines (SD 1.x/2.x, SDXL): classifier-free guidance batched as
    [unconditional; conditional], the scheduler's own step (eta for DDIM), x0 from the scheduler."""

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def _prepare_timesteps(self, num_inference_steps, device, timesteps, sigmas, height, width):
        return retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)

    def _prepare_candidate_latents(self, count, height, width, dtype, device, generators):
        return self.prepare_latents(count, self.unet.config.in_channels, height, width, dtype, device, generators)

    def _model_output(self, latents, t, conditioning, chunk):
        return self._guided_noise(latents, t, conditioning, chunk)

    def _guided_noise(
        self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, chunk: int
    ) -> torch.Tensor:
        """The (classifier-free guided) noise prediction of every live candidate, `chunk` candidates per UNet call."""
        return guided_noise_pred(
            self.unet,
            self.scheduler,
            latents,
            t,
            conditioning,
            self.guidance_scale,
            chunk,
            timestep_cond=guidance_embedding(self, self.guidance_scale),
            guidance_rescale=self.guidance_rescale,
            cross_attention_kwargs=self.cross_attention_kwargs,
        )

    def _denoise_step(self, model_output, t, step_index, latents, generators, eta):
        step_kwargs = self.prepare_extra_step_kwargs(generators, eta)
        return self.scheduler.step(model_output, t, latents, **step_kwargs, return_dict=True)

    def _decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        return decode_latents(self, latents, chunk)

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: object, adapter_name: str | None = None, **kwargs
    ):
        """diffusers' `load_lora_weights`, after checking that the LoRA was made for this base model (a LoRA for
        another architecture fails with a `LoraCompatibilityError` naming both, before anything is loaded)."""
        check_lora_compatible(pretrained_model_name_or_path_or_dict, self.denoiser, kwargs.get("weight_name"))
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def _is_deterministic(self, eta: float) -> bool:
        return deterministic_steps(self.scheduler, eta)

    def _default_image_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


class RewardGuidedPipeline(UNetFamilyMixin, StableDiffusionPipeline):
    """Best-of-N Stable Diffusion 1.x/2.x with a GAN-RM reward model (see `RewardGuidedMixin.__call__`)."""

    _optional_components = [*StableDiffusionPipeline._optional_components, "reward_model"]
    # The reward model is called outside `forward`, where offloading hooks would not move it: keep it on the device.
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = 7.5

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = True,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_modules(reward_model=reward_model)

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
    ) -> Conditioning:
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        embeds, negative = self.encode_prompt(
            prompts,
            device,
            1,
            self.do_classifier_free_guidance,
            negative_prompt,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )
        return Conditioning(embeds, negative if self.do_classifier_free_guidance else None)

    def _finish_images(
        self, images: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[bool] | None]:
        """The safety checker, when the pipeline has one, on the returned images (as the base pipeline does)."""
        if self.safety_checker is None:
            return images, None
        checked, nsfw = self.run_safety_checker(images * 2 - 1, device, dtype)
        return (checked / 2 + 0.5).clamp(0, 1), nsfw


class RewardGuidedXLPipeline(UNetFamilyMixin, StableDiffusionXLPipeline):
    """Best-of-N SDXL with a GAN-RM reward model (see `RewardGuidedMixin.__call__`; SDXL's own conditioning
    arguments prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size and their negative_*
    counterparts are accepted as keywords)."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "reward_model"]
    _exclude_from_cpu_offload = ["reward_model"]
    default_guidance_scale = 5.0

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        reward_model: GANRewardModel | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_modules(reward_model=reward_model)

    def _default_image_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    def _encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        device: torch.device,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
    ) -> Conditioning:
        guided = self.do_classifier_free_guidance
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            lora_scale=(self.cross_attention_kwargs or {}).get("scale"),
            clip_skip=self.clip_skip,
        )
        projection_dim = (
            self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])
        )
        size = (height, width)

        def time_ids(original: tuple | None, crop: tuple, target: tuple | None) -> torch.Tensor:
            ids = self._get_add_time_ids(original or size, crop, target or size, embeds.dtype, projection_dim)
            return ids.to(device).repeat(len(prompts), 1)

        positive_ids = time_ids(original_size, crops_coords_top_left, target_size)
        if not guided:
            return Conditioning(embeds, text_embeds=pooled, time_ids=positive_ids)
        negative_ids = (
            time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size)
            if negative_original_size is not None and negative_target_size is not None
            else positive_ids
        )
        return Conditioning(embeds, negative, pooled, negative_pooled, positive_ids, negative_ids)

    def _finish_images(
        self, images: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[bool] | None]:
        """The invisible watermark, when the pipeline adds one (as the base pipeline does)."""
        if self.watermark is None:
            return images, None
        return (self.watermark.apply_watermark(images * 2 - 1) / 2 + 0.5).clamp(0, 1), None


# The families a reward-guided pipeline exists for: name -> (its class, the diffusers pipeline classes it serves,
# the denoiser class that identifies a pipeline saved under another class name). Classes are named, not imported:
# the flow-matching module imports this one.
FAMILIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "Stable Diffusion 1.x/2.x": (
        "RewardGuidedPipeline",
        ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"),
        "UNet2DConditionModel",
    ),
    "SDXL": ("RewardGuidedXLPipeline", ("StableDiffusionXLPipeline",), "UNet2DConditionModel"),
    "SD3.x": ("RewardGuidedSD3Pipeline", ("StableDiffusion3Pipeline",), "SD3Transformer2DModel"),
    "FLUX.1": ("RewardGuidedFluxPipeline", ("FluxPipeline",), "FluxTransformer2DModel"),
    "FLUX.2 klein": ("RewardGuidedFlux2KleinPipeline", ("Flux2KleinPipeline",), "Flux2Transformer2DModel"),
    "Qwen-Image": ("RewardGuidedQwenImagePipeline", ("QwenImagePipeline",), "QwenImageTransformer2DModel"),
}


class UnsupportedPipelineError(PipelineInputError):
    """A pipeline of a model family that has no reward-guided pipeline."""


def reward_guided_class_for(model_index: dict) -> type[DiffusionPipeline]:
    """The reward-guided pipeline class for a pipeline's model_index.json: by its class name, or (for a pipeline
    saved under a class name diffusers does not know) by its denoiser's class, UNets told apart by SDXL's second
    text encoder. Another diffusers pipeline is refused even where its denoiser matches a family's: FLUX.2 [dev]
    shares FLUX.2 [klein]'s transformer, Qwen-Image-Edit Qwen-Image's, but their calls and encoders differ."""
    import diffusers

    class_name = str(model_index.get("_class_name", ""))
    family = next(
        (name for name, (ours, bases, _) in FAMILIES.items() if class_name == ours or class_name in bases), None
    )
    if family is None and not hasattr(diffusers, class_name):
        denoiser = model_index.get("transformer") or model_index.get("unet") or [None, None]
        matches = [name for name, (_, _, model) in FAMILIES.items() if denoiser[1] == model]
        if len(matches) > 1:  # SD and SDXL share the UNet class
            matches = [name for name in matches if (name == "SDXL") == ("text_encoder_2" in model_index)]
        family = matches[0] if matches else None
    if family is None:
        raise UnsupportedPipelineError(
            f"{class_name or 'this pipeline'} is not a model family with a reward-guided pipeline; supported "
            f"families: {', '.join(f'{name} ({FAMILIES[name][1][0]})' for name in FAMILIES)}"
        )
    from ganrm_diffusers.generation import pipeline_flow

    class_name = FAMILIES[family][0]
    return globals().get(class_name) or getattr(pipeline_flow, class_name)


def load_reward_guided_pipeline(
    pretrained_model_name_or_path: str | os.PathLike,
    reward_model: GANRewardModel | None = None,
    **kwargs: object,
) -> DiffusionPipeline:
    """Load a pipeline (folder or Hub id) of a supported family (see `FAMILIES`: SD 1.x/2.x, SDXL, SD3.x, FLUX.1,
    FLUX.2 klein, Qwen-Image) as its reward-guided pipeline; a `reward_model` given here replaces one saved with the
    pipeline. Any other family fails with an `UnsupportedPipelineError` naming the supported ones, before weights are read."""
    try:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
    except (OSError, ValueError) as error:
        raise PipelineInputError(
            f"cannot read a diffusers pipeline from {pretrained_model_name_or_path}: {error}"
        ) from error
    pipeline_class = reward_guided_class_for(config)
    if reward_model is not None:
        kwargs["reward_model"] = reward_model
    return pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "local_files_only", "revision", "token")
    return {key: kwargs[key] for key in keys if key in kwargs}
