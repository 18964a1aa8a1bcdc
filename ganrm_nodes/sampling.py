"""Best-of-N inside ComfyUI's own sampling: N candidates as one batch, pruned early on their x0 predictions.

ComfyUI's samplers hand every step's prediction of the clean latent (`denoised`, x0) to a callback, for every model
type ComfyUI loads, so the reward can judge the candidates while they are sampled, with no per-architecture code:
decode the x0 predictions with the VAE, score them with the library's scorer, keep the best with the library's
schedules (`ganrm_diffusers.generation.pruning`, the code the diffusers pipelines run).

Layout. A LATENT of B images gets N candidates each, laid out as RepeatLatentBatch(N) lays them out: row
r = j * B + b is candidate j of image b. ComfyUI tiles a CONDITIONING batch of B prompts over the rows the same
way (row r gets prompt r % B), and row r's noise is the noise KSampler gives row r of that batch, so a candidate
regenerates alone with KSampler from LatentFromBatch(batch_index=r) of the repeated latent.

Pruning is ONE sampler call (`comfy.sample.sample`, what KSampler calls). The sampler keeps all B * N rows, but
after a checkpoint only the survivors' rows go through the diffusion model (`LiveRows`, a model function wrapper);
pruned rows get back denoised = x, which freezes them, and are never returned. A survivor therefore sees exactly
the steps, the sampler's history and the noise stream of the unpruned run (ancestral and SDE samplers draw noise
for the whole batch): it is the image the unpruned run gives that candidate, for every sampler whose update of a
row reads only that row. Multi-step samplers keep their history, which splitting the sigmas would reset.

FK resampling must copy rows into others, which a running sampler cannot do: it samples segment by segment
between its checkpoints (KSamplerAdvanced's start and end steps), each segment a fresh sampler call.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.model_management as model_management
import comfy.sample
import comfy.utils
import latent_preview
import torch

from ganrm_diffusers.generation.pruning import FKResampling, PruneSchedule, ScheduleError
from ganrm_diffusers.generation.selection import select_top_k
from ganrm_diffusers.utils.errors import ImageInputError

# Samplers that choose their own steps: a checkpoint "after 30 % of the steps" means nothing to them.
OWN_STEP_SAMPLERS = ("dpm_fast", "dpm_adaptive")
# Substrings of the names of ComfyUI samplers that add noise at each step (FK's copies diverge only there).
NOISY_SAMPLER_MARKS = ("ancestral", "sde", "ddpm", "lcm", "seeds_", "sa_solver")


def adds_noise(sampler_name: str) -> bool:
    return any(mark in sampler_name for mark in NOISY_SAMPLER_MARKS)


def check_schedule_fits(
    schedule: PruneSchedule | FKResampling | None, sampler_name: str, steps: int, num_candidates: int, top_k: int
) -> None:
    """Refuse a schedule that cannot be followed: before any sampling starts."""
    if not 1 <= top_k <= num_candidates:
        raise ScheduleError(f"top_k {top_k} must be between 1 and num_candidates {num_candidates}")
    if schedule is None:
        return
    if sampler_name in OWN_STEP_SAMPLERS:
        raise ScheduleError(
            f"{sampler_name} chooses its own steps, so it has no step to prune at: use another sampler, "
            "or turn pruning off"
        )
    for fraction, step in zip(schedule.at, schedule.checkpoints(steps), strict=True):
        if step >= steps - 1:
            raise ScheduleError(
                f"checkpoint {fraction:g} falls on the last of the {steps} steps: nothing would be left to prune"
            )
    if len(set(schedule.checkpoints(steps))) != len(schedule.at):
        raise ScheduleError(f"checkpoints {schedule.at} fall on the same step of {steps}: spread them out")
    if isinstance(schedule, FKResampling) and not adds_noise(sampler_name):
        raise ScheduleError(
            f"FK resampling needs a sampler that adds noise at every step (ancestral, SDE, ddpm, lcm...): "
            f"with {sampler_name} the copies of a candidate would stay identical"
        )


# ---------------------------------------------------------------------------------------------------------------
# Only the live candidates through the diffusion model


def _take_rows(value: object, index: torch.Tensor, batch: int) -> object:
    """Restrict a conditioning value to the rows `index` of a `batch`-row call: its tensors of `batch` rows, also
    inside plain dicts and lists (ControlNet outputs); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[index.to(value.device)]
    if type(value) is dict:
        return {key: _take_rows(item, index, batch) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_take_rows(item, index, batch) for item in value)
    return value


class LiveRows:
    """A model function wrapper that puts only the live candidates' rows through the diffusion model.

    ComfyUI's calc_cond_batch calls it with the rows of one or more conditionings (cond, uncond, area conds)
    stacked, each chunk all the sampler's rows. Dead rows get denoised = x back. The rows of one call are split
    when ComfyUI's model management says they do not fit in free memory, as calc_cond_batch splits conditionings.
    An earlier wrapper on the MODEL (another node's) is kept and called with the reduced batch. ControlNet and
    T2I-Adapter outputs are computed by ComfyUI for all rows before this wrapper (their cost is not pruned) and
    sliced here. A model patched with per-row tensors this wrapper cannot see (GLIGEN, regional attention masks)
    fails on a reduced batch: from then on every row goes through the model (correct, with no saving).
    """

    def __init__(self, rows: int, inner: Callable | None = None):
        self.rows = rows
        self.inner = inner
        self.live: torch.Tensor | None = None  # candidate rows still sampled; None = all
        self.evaluated_rows = 0  # rows that went through the diffusion model (cond and uncond rows both count)
        self.offered_rows = 0  # rows ComfyUI asked for: what running every candidate to the end would cost
        self.unprunable: str | None = None  # why reduced batches failed, once they have

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        x = args["input"]
        self.offered_rows += int(x.shape[0])
        chunks = len(args["cond_or_uncond"])
        if x.shape[0] != chunks * self.rows or self.unprunable is not None:
            return self._apply(apply_model, args)  # not the candidates' batch, or a model that needs every row
        live = torch.arange(self.rows) if self.live is None else self.live
        per_call = self._candidates_per_call(apply_model, x, chunks, len(live))
        if len(live) == self.rows and per_call >= self.rows:
            return self._apply(apply_model, args)  # exactly what ComfyUI itself would run
        try:
            return self._apply_live(apply_model, args, live, per_call, chunks)
        except RuntimeError as error:
            if "size" not in str(error) and "shape" not in str(error):
                raise
            self.unprunable = str(error).splitlines()[0]
            logging.warning("GAN-RM Best-of-N Sampler: the model needs every row (%s); sampling all", self.unprunable)
            return self._apply(apply_model, args)

    def _apply_live(
        self, apply_model: Callable, args: dict, live: torch.Tensor, per_call: int, chunks: int
    ) -> torch.Tensor:
        x = args["input"]
        out = None
        for piece in live.split(per_call):
            index = torch.cat([piece + chunk * self.rows for chunk in range(chunks)])
            reduced = {
                "input": x[index.to(x.device)],
                "timestep": args["timestep"][index.to(args["timestep"].device)],
                "c": self._conditioning(args["c"], index, piece, x.shape[0]),
                "cond_or_uncond": args["cond_or_uncond"],
            }
            result = self._apply(apply_model, reduced)
            if out is None:
                out = x.to(result.dtype).clone()  # denoised = x: a pruned row stands still
            out[index.to(out.device)] = result
        return out

    def _conditioning(self, c: dict, index: torch.Tensor, piece: torch.Tensor, batch: int) -> dict:
        reduced = {}
        for key, value in c.items():
            if key == "transformer_options":
                # Only its per-row sigmas; the rest (sample_sigmas, patches) is not indexed by rows.
                reduced[key] = dict(value)
                sigmas = value.get("sigmas")
                if isinstance(sigmas, torch.Tensor) and sigmas.ndim > 0 and sigmas.shape[0] == self.rows:
                    reduced[key]["sigmas"] = sigmas[piece.to(sigmas.device)]
            else:
                reduced[key] = _take_rows(value, index, batch)
        return reduced

    def _apply(self, apply_model: Callable, args: dict) -> torch.Tensor:
        if self.inner is not None:
            result = self.inner(apply_model, args)
        else:
            result = apply_model(args["input"], args["timestep"], **args["c"])
        self.evaluated_rows += int(args["input"].shape[0])  # rows of calls that finished
        return result

    def _candidates_per_call(self, apply_model: Callable, x: torch.Tensor, chunks: int, live: int) -> int:
        """The most live candidates whose rows fit in free memory at once (ComfyUI's estimate, its 1.5x margin)."""
        base_model = getattr(apply_model, "__self__", None)
        if base_model is None or not hasattr(base_model, "memory_required"):
            return live
        free = model_management.get_free_memory(x.device)
        count = live
        while count > 1 and base_model.memory_required([chunks * count, *x.shape[1:]]) * 1.5 >= free:
            count = math.ceil(count / 2)
        return count


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class CandidateBatch:
    """The candidates' starting point: latents, noise and per-row entries, B images x N candidates."""

    groups: int
    num_candidates: int
    latents: torch.Tensor
    noise: torch.Tensor
    batch_index: list[int]
    noise_mask: torch.Tensor | None

    @property
    def rows(self) -> int:
        return self.groups * self.num_candidates

    def rows_of(self, live: torch.Tensor) -> torch.Tensor:
        """Rows of the live candidates [B, M] (candidate numbers per image), in the same shape."""
        return _slot_rows(self.num_candidates, self.groups, live)


def candidate_batch(model: object, latent: dict, num_candidates: int, seed: int) -> CandidateBatch:
    """N candidates of each image of `latent`, with the noise KSampler gives RepeatLatentBatch(N) of it."""
    samples = latent.get("samples")
    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        raise ImageInputError("the LATENT has no plain samples tensor (nested latents are not supported)")
    if samples.shape[0] == 0:
        raise ImageInputError("the LATENT batch is empty: there is nothing to sample")
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    groups = samples.shape[0]
    repeat = [num_candidates] + [1] * (samples.ndim - 1)
    latents = samples.repeat(repeat)
    # RepeatLatentBatch's batch indices, so that LatentFromBatch + KSampler regenerates one candidate.
    base = latent.get("batch_index", list(range(groups)))
    offset = max(base) - min(base) + 1
    batch_index = [base[row % groups] + (row // groups) * offset for row in range(groups * num_candidates)]
    noise = comfy.sample.prepare_noise(latents, seed, batch_index if "batch_index" in latent else None)
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim > 0 and mask.shape[0] == groups and groups > 1:
        mask = mask.repeat([num_candidates] + [1] * (mask.ndim - 1))
    return CandidateBatch(groups, num_candidates, latents, noise, batch_index, mask)


@dataclass
class CandidateResult:
    """What a run finished: for each image, its top-k candidates (best first) and how every candidate fared."""

    rows: torch.Tensor  # chosen rows, image-major, best first within each image
    samples: torch.Tensor  # their final latents (KSampler's output space)
    images: torch.Tensor  # their decoded images, ComfyUI IMAGE [K, H, W, C]
    scores: torch.Tensor  # their final rewards
    batch_index: list[int]
    last_images: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> its last decoded image [H, W, C]
    last_scores: dict[int, float] = field(default_factory=dict)
    pruned_at: dict[int, int] = field(default_factory=dict)  # row -> steps done when it was dropped
    evaluated_rows: int = 0  # rows through the diffusion model
    full_rows: int = 0  # what full best-of-N would put through it
    unprunable: str | None = None  # why every row had to go through the model, if it had


@dataclass
class SamplingSettings:
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float


class CandidateSampler:
    """Best-of-N over ComfyUI's samplers with a pruning or FK schedule (None: full best-of-N)."""

    def __init__(
        self,
        model: object,
        vae: object,
        score: Callable[[torch.Tensor, list[int]], torch.Tensor],
        positive: list,
        negative: list,
        settings: SamplingSettings,
        top_k: int,
        schedule: PruneSchedule | FKResampling | None,
    ):
        self.model, self.vae, self.score_rows = model, vae, score
        self.positive, self.negative = positive, negative
        self.settings, self.top_k, self.schedule = settings, top_k, schedule

    def run(self, batch: CandidateBatch) -> CandidateResult:
        s = self.settings
        check_schedule_fits(self.schedule, s.sampler_name, s.steps, batch.num_candidates, self.top_k)
        if isinstance(self.schedule, FKResampling) and batch.noise_mask is not None:
            # A later segment would start from noisy latents, which KSamplerX0Inpaint also takes as the picture
            # to keep outside the mask.
            raise ScheduleError("FK resampling cannot inpaint (the LATENT has a noise mask): use pruning instead")
        self.batch = batch
        self.result = CandidateResult(
            rows=torch.empty(0), samples=torch.empty(0), images=torch.empty(0), scores=torch.empty(0), batch_index=[]
        )
        total = batch.groups * (
            self.schedule.unet_evaluations(batch.num_candidates, s.steps, self.top_k)
            if self.schedule is not None
            else batch.num_candidates * s.steps
        )
        self.progress = _Progress(self.model, total)
        # The sampled MODEL: a clone whose model function only lets the live candidates' rows through.
        self.gate = LiveRows(batch.rows, self.model.model_options.get("model_function_wrapper"))
        self.sampled = self.model.clone()
        self.sampled.set_model_unet_function_wrapper(self.gate)
        self.result.full_rows = 0
        if isinstance(self.schedule, FKResampling):
            samples, rows = self._sample_fk()
        else:
            samples, rows = self._sample_pruned()
            self.result.full_rows = self.gate.offered_rows  # every call is offered all rows
        self.result.evaluated_rows = self.gate.evaluated_rows
        self.result.unprunable = self.gate.unprunable
        return self._finish(samples, rows)

    # -- pruning: one sampler call -----------------------------------------------------------------------------

    def _sample_pruned(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, s = self.batch, self.settings
        live = torch.arange(batch.num_candidates).repeat(batch.groups, 1)  # [B, M] candidate numbers
        run = (
            self.schedule.start(s.steps, self.top_k, self._seeds(), batch.num_candidates)
            if self.schedule is not None
            else None
        )
        checkpoints = run.checkpoints if run is not None else set()

        def on_step(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            nonlocal live
            rows = batch.rows_of(live)
            self.progress.step(x0, rows.numel(), int(rows.flatten()[0]))
            if step in checkpoints:
                scores = self._judge(x0, rows)
                live = torch.gather(live, 1, run.survivors(step, scores).parents)
                self.gate.live = batch.rows_of(live).flatten()
                self._mark_pruned(rows, batch.rows_of(live), step + 1)

        samples = self._sample(batch.noise, batch.latents, batch.noise_mask, on_step, s.seed)
        return samples, batch.rows_of(live)

    # -- FK resampling: one sampler call per segment ------------------------------------------------------------

    def _sample_fk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Segments between the resampling checkpoints, each a sampler call from where the last one stopped
        (KSamplerAdvanced's start and end steps). Particle slot j of latent b is row j * B + b throughout, so
        that ComfyUI's tiling of a CONDITIONING batch still gives each row its latent's prompt."""
        batch, s = self.batch, self.settings
        run = self.schedule.start(s.steps, self.top_k, self._seeds(), batch.num_candidates)
        latents, noise, particles, start = batch.latents, batch.noise, batch.num_candidates, 0
        recorded: dict[str, torch.Tensor] = {}

        def on_step(step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
            recorded["x0"] = x0  # the segment's last call leaves the x0 prediction of its last step
            self.progress.step(x0, x0.shape[0], 0)

        for segment, checkpoint in enumerate([*sorted(run.checkpoints), s.steps - 1]):
            end = checkpoint + 1
            self.gate.rows = batch.groups * particles
            seed = s.seed if segment == 0 else _derived_seed(s.seed, "segment", segment)
            first, last = (start if segment else None), (end if end < s.steps else None)
            offered = self.gate.offered_rows
            samples = self._sample(noise, latents, None, on_step, seed, start_step=first, last_step=last)
            # What these steps cost with all N particles (a shrunk population is offered fewer rows).
            self.result.full_rows += (self.gate.offered_rows - offered) * batch.num_candidates // particles
            if end >= s.steps:
                break
            slots = _slot_rows(particles, batch.groups)
            parents = run.survivors(checkpoint, self._judge(recorded["x0"], slots, record=False)).parents
            particles = parents.shape[1]
            latents = samples[_slot_rows(particles, batch.groups, parents).T.flatten()]  # copy-major again
            noise = torch.zeros_like(latents)
            start = end
        return samples, _slot_rows(particles, batch.groups)

    # -- shared ------------------------------------------------------------------------------------------------

    def _sample(
        self,
        noise: torch.Tensor,
        latents: torch.Tensor,
        mask: torch.Tensor | None,
        callback: Callable,
        seed: int,
        start_step: int | None = None,
        last_step: int | None = None,
    ) -> torch.Tensor:
        s = self.settings
        return comfy.sample.sample(
            self.sampled,
            noise,
            s.steps,
            s.cfg,
            s.sampler_name,
            s.scheduler,
            self.positive,
            self.negative,
            latents,
            denoise=s.denoise,
            start_step=start_step,
            last_step=last_step,
            noise_mask=mask,
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )

    def _seeds(self) -> list[int]:
        """One seed per candidate, image-major, as the library's schedules take them (FK draws each image's
        resampling from its first): derived from the node's seed, so that seed + 1 is not another image's."""
        return [
            _derived_seed(self.settings.seed, "latent", group)
            for group in range(self.batch.groups)
            for _ in range(self.batch.num_candidates)
        ]

    def _judge(self, x0: torch.Tensor, rows: torch.Tensor, record: bool = True) -> torch.Tensor:
        """Decode and score the x0 predictions of `rows` [B, M]; scores in the same shape. `record` keeps each
        candidate's image and score for the preview (FK's rows are slots, not candidates: not recorded)."""
        model_management.throw_exception_if_processing_interrupted()
        flat = rows.flatten()
        latents = self.model.model.process_latent_out(x0[flat.to(x0.device)].to(torch.float32))
        images = decode(self.vae, latents)
        scores = self.score_rows(images, [int(row) % self.batch.groups for row in flat.tolist()])
        # Decoding and scoring may have pushed the sampled model out of memory: bring it back before its next step.
        model_management.load_models_gpu([self.sampled])
        if record:
            for row, image, value in zip(flat.tolist(), images, scores.tolist(), strict=True):
                self.result.last_images[row] = image
                self.result.last_scores[row] = value
        return scores.view(rows.shape)

    def _mark_pruned(self, before: torch.Tensor, after: torch.Tensor, steps_done: int) -> None:
        for row in set(before.flatten().tolist()) - set(after.flatten().tolist()):
            self.result.pruned_at[row] = steps_done

    def _finish(self, samples: torch.Tensor, rows: torch.Tensor) -> CandidateResult:
        model_management.throw_exception_if_processing_interrupted()
        flat = rows.flatten()
        images = decode(self.vae, samples[flat])
        scores = self.score_rows(images, [int(row) % self.batch.groups for row in flat.tolist()])
        selection = select_top_k(scores, self.top_k, group_size=rows.shape[1])
        chosen = flat[selection.selected]
        result = self.result
        for row, image, value in zip(flat.tolist(), images, scores.tolist(), strict=True):
            result.last_images[row] = image
            result.last_scores[row] = value
        result.rows = chosen
        result.samples = samples[chosen]
        result.images = images[selection.selected]
        result.scores = selection.scores
        result.batch_index = [self.batch.batch_index[row] for row in chosen.tolist()]
        return result


def _slot_rows(particles: int, groups: int, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [B, M] of particle slots (default all `particles` of each latent): slot j of latent b is j * B + b."""
    slots = torch.arange(particles).repeat(groups, 1) if slots is None else slots
    return slots * groups + torch.arange(groups).unsqueeze(1)


def _derived_seed(seed: int, purpose: str, index: int) -> int:
    """A 64-bit seed for one purpose and index, unrelated to seed + 1's (a hash, not an offset)."""
    digest = hashlib.sha256(f"ganrm:{seed}:{purpose}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def decode(vae: object, latents: torch.Tensor) -> torch.Tensor:
    """VAE Decode as the core node does it: IMAGE [B, H, W, C]; a one-frame video latent counts as an image."""
    images = vae.decode(latents)
    if images.ndim == 5:
        if images.shape[1] != 1:
            raise ImageInputError(f"the VAE decoded {images.shape[1]} frames per latent: video is not supported")
        images = images[:, 0]
    return images


class _Progress:
    """ComfyUI's progress bar over candidate-steps (a pruned run has fewer), with the latent preview."""

    def __init__(self, model: object, total: int):
        self.bar = comfy.utils.ProgressBar(max(1, total))
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done = 0

    def step(self, x0: torch.Tensor, live: int, preview_row: int) -> None:
        model_management.throw_exception_if_processing_interrupted()
        self.done += live
        preview = None
        if self.previewer is not None:
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[preview_row : preview_row + 1])
        self.bar.update_absolute(self.done, None, preview)


def parse_schedule(
    mode: str, checkpoints: str, keep: str, num_candidates: int, top_k: int, fk_lambda: float, fk_potential: str
) -> PruneSchedule | FKResampling | None:
    """The node's schedule inputs as a library schedule. Keep counts are candidates per image after each
    checkpoint; the library takes fractions of the live candidates, so counts become exact fractions."""
    if mode == "off":
        return None
    if mode == "default":
        return PruneSchedule()
    at = _numbers(checkpoints, float, "checkpoints")
    counts = _numbers(keep, int, "keep") if keep.strip() else None
    if counts is not None and len(counts) != len(at):
        raise ScheduleError(f"give one keep count per checkpoint: {len(at)} checkpoints, {len(counts)} counts")
    fractions = None
    if counts is not None:
        fractions, live = [], num_candidates
        for count in counts:
            if not top_k <= count <= live:
                raise ScheduleError(
                    f"keep counts must go down from num_candidates {num_candidates} and stay >= top_k {top_k}, "
                    f"got {counts}"
                )
            fractions.append(count / live)
            live = count
    if mode == "custom":
        if fractions is None:
            raise ScheduleError(
                "a custom pruning schedule needs keep counts (candidates per image after each checkpoint)"
            )
        return PruneSchedule(at=tuple(at), keep=tuple(fractions))
    if mode == "fk":
        return FKResampling(
            at=tuple(at), keep=tuple(fractions) if fractions else None, lambda_=fk_lambda, potential=fk_potential
        )
    raise ScheduleError(f"unknown pruning mode {mode!r}")


def _numbers(text: str, kind: type, name: str) -> list:
    parts = [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]
    if not parts:
        raise ScheduleError(f"{name} is empty: give comma-separated values")
    try:
        return [kind(part) for part in parts]
    except ValueError:
        raise ScheduleError(f"{name} must be comma-separated {kind.__name__} values, got {text!r}") from None


def check_prompt_batch(positive: list, negative: list, groups: int) -> None:
    """A CONDITIONING batch must hold one prompt, or one per latent: ComfyUI tiles it over the rows, so another
    size would mix prompts within a latent's candidates."""
    for name, conditioning in (("positive", positive), ("negative", negative)):
        for entry in conditioning:
            size = entry[0].shape[0] if isinstance(entry[0], torch.Tensor) else 1
            if size not in (1, groups):
                raise ImageInputError(
                    f"the {name} CONDITIONING has a batch of {size} prompts for a LATENT of {groups}: give one "
                    f"prompt, or one per latent"
                )


def group_prompts(text: str, groups: int) -> Sequence[str] | None:
    """The reward model's prompt for each group (latent): one text for all, or one line per group."""
    text = text.strip()
    if not text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if groups > 1 and len(lines) == groups else [text] * groups
